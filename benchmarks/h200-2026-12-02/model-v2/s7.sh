# Issue 15 model v2, session 7. Usage:
#   bash .carry/a/s7.sh probe  BUDGET_S   # set-up, two candidates concurrently, pick by concentration, resume the winner
#   bash .carry/a/s7.sh resume BUDGET_S   # resume the winner
#   bash .carry/a/s7.sh final  BUDGET_S   # resume, then --eval and the card
# Every call leaves the pipeline folder (tar), logs and the eval under $OUT.
MODE=$1; BUDGET=$2; T0=$(date +%s)
[ -n "$NOSETUP" ] || . .carry/a/setup.sh
export PYTHONPATH=${PYTHONPATH:-/tmp/site} PYTHONUNBUFFERED=1
PY=${PY:-python3}
mkdir -p $OUT
COMMON=${COMMON:-"--total-minutes 20 --t-mean 0.5 --curriculum 0.2 --log-every 200 --seed 0"}
CAND_A=${CAND_A:-"--frames 32 --patch 4 --layers 4"}
CAND_B=${CAND_B:-"--frames 8 --patch 2 --layers 4"}
W=${WORK:-/tmp/v2}; mkdir -p $W
left_min() { python3 -c "import time; print(max(0.2, ($BUDGET - (time.time() - $T0) - $1) / 60))"; }
train() {  # $1 name, $2 minutes, rest: options
  n=$1; m=$2; shift 2
  $PY -m dit_sparse.pipelines.train_reference $COMMON "$@" --max-minutes $m --out $W/$n --checkpoint $W/$n.pt --resume \
    2>&1 | grep -v -i warn | tee -a $OUT/train_$n.txt | grep -E "trained|Error|error|chosen|adher|motion" ; }
conc() {  # $1 name
  $PY -m dit_sparse.pipelines.train_reference --eval-only $W/$1 --attention-only > $W/conc_$1.json 2>$W/conc_$1.err
  $PY -c "import json,statistics as s; a=json.load(open('$W/conc_$1.json'))['attention']; d=[v['density_for_90%'] for v in a.values()]; print('$1', [round(x,3) for x in d], 'median', round(s.median(d),3))" | tee -a $OUT/conc.txt; }
if [ "$MODE" = probe ]; then
  PM=${PROBE_MIN:-3.5}
  train a $PM $CAND_A & train b $PM $CAND_B & wait
  conc a; conc b
  win=$($PY -c "import json,statistics as s
m={n: s.median(v['density_for_90%'] for v in json.load(open('$W/conc_'+n+'.json'))['attention'].values()) for n in 'ab'}
print(min(m, key=m.get))")
  echo $win > $W/winner; echo "winner $win" | tee -a $OUT/conc.txt
fi
win=$(cat $W/winner); [ $win = a ] && OPTS=$CAND_A || OPTS=$CAND_B
echo "winner $win: $OPTS" | tee -a $OUT/conc.txt
if [ "$MODE" = final ]; then
  train $win $(left_min ${EVAL_S:-200}) $OPTS --eval --eval-out $W/eval
  conc $win
else
  train $win $(left_min 60) $OPTS
  conc $win
fi
tar -C $W -cf $OUT/model.tar $win
[ -d $W/eval ] && tar -C $W -cf $OUT/eval.tar eval $win-raw/transformer/config.json
cp $W/$win/train_log.json $OUT/ 2>/dev/null
echo "call $MODE took $(( $(date +%s) - T0 )) s"
