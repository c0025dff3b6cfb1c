# issue 5 evaluation at 32k + end-to-end prefill latency
R=/tmp/runs; D=/tmp/data; mkdir -p $OUT
E="--datasets $D/pg19-mini.jsonl,$D/proofpile-mini.jsonl --lengths 32768 --max_docs ${MAX_DOCS:-8} --plot false"
python -m seer_attn.evaluation.ppl --model smollm2-135m --yarn_factor 4 --methods dense --nz_ratios 1.0 $E --output_dir $R/eval_base 2>&1 | tail -6
python -m seer_attn.evaluation.ppl --model $R/ft_dense --methods dense,oracle,oracle_mass,static --nz_ratios 1.0,0.5,0.1 $E --output_dir $R/eval_dense 2>&1 | tail -12
python -m seer_attn.evaluation.ppl --model $R/ft_s05 --methods dense,seer --nz_ratios 1.0,0.5,0.3,0.1 $E --output_dir $R/eval_s05 2>&1 | tail -12
python -m seer_attn.evaluation.ppl --model $R/ft_s01 --methods dense,seer --nz_ratios 1.0,0.1 $E --output_dir $R/eval_s01 2>&1 | tail -10
for n in base dense s05 s01; do cp $R/eval_$n/ppl_results.json $OUT/ppl32k_$n.json; done
python benchmarks/bench_prefill.py --model $R/ft_s05 --length 32768 --nz-ratios 0.5,0.1 --out $OUT/prefill_32k.json 2>&1 | tail -8
