import torch

from dit_sparse.context import AttentionContext
from dit_sparse.methods.pooled import PooledBlocks, PooledConfig
from dit_sparse.methods.semantic.method import SemanticConfig, SemanticPermutation
from dit_sparse.state import LayerStates


def _ctx(step, states):
    return AttentionContext(layer=1, layer_name="l1", num_layers=2, step=step, num_steps=10, branch="cond",
                            layout=None, sparsity=0.8, states=states)


def test_replan_every_reuses_the_same_plan_object_then_replans():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 200, 64, generator=g) for _ in range(3))
    for method in (SemanticPermutation(0.8, SemanticConfig(replan_every=3)),
                   PooledBlocks(0.8, PooledConfig(block_size=16, replan_every=3))):
        states = LayerStates()
        plans = [method.plan(q + 0.01 * s, k, v, _ctx(s, states)) for s in range(5)]
        assert plans[0] is plans[1] is plans[2]
        assert plans[3] is not plans[2] and plans[3] is plans[4]
        # a new input shape never reuses a plan built for another one
        p_other = method.plan(q[:, :, :150], k[:, :, :150], v[:, :, :150], _ctx(4, states))
        assert p_other.seq_len_q == 150
