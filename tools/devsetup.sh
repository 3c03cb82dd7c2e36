# Source on the GPU machine from the repo root: installs carried wheels (.whl/) and makes
# `import dit_sparse` (with its kernels/pipelines/eval subpackages) importable without pip install.
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
fi
rm -rf /tmp/dsroot && mkdir -p /tmp/dsroot/dit_sparse
for f in "$PWD"/dit_sparse/*; do ln -s "$f" /tmp/dsroot/dit_sparse/; done
ln -s "$PWD/kernels" /tmp/dsroot/dit_sparse/kernels
ln -s "$PWD/pipelines" /tmp/dsroot/dit_sparse/pipelines
ln -s "$PWD/eval" /tmp/dsroot/dit_sparse/eval
export PYTHONPATH=/tmp/dsroot:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# The repo root must not shadow /tmp/dsroot (its dit_sparse/ lacks the mapped subpackages).
export PYTHONSAFEPATH=1
python3 -c "import dit_sparse.kernels, torch; print('devsetup ok', torch.__version__, torch.cuda.get_device_name())" || return 1
