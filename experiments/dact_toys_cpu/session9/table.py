import json, os, sys
import numpy as np
seeds = [s for s in (0, 1, 2) if os.path.isfile(f'runs/dact9_s{s}/results.json')]
R = {s: json.load(open(f'runs/dact9_s{s}/results.json')) for s in seeds}
def mean4(v, k='ndcg@10'): return np.mean([p['test'][k] for p in v['periods']])
print("seeds", seeds)
print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd | mean R@10 | code change | seconds (seed 0) |")
print("|---" * (len(seeds) + 6) + "|")
p0 = [R[s]['period_0']['test']['ndcg@10'] for s in seeds]
print("| period 0 (test N@10) | " + " | ".join(f"{x:.4f}" for x in p0) + f" | {np.mean(p0):.4f} | {np.std(p0, ddof=1) if len(p0)>1 else 0:.4f} | {np.mean([R[s]['period_0']['test']['recall@10'] for s in seeds]):.4f} | | {R[seeds[0]]['timing']['period_0']:.0f} |")
table = {}
for m in R[seeds[0]]['methods']:
    v = [mean4(R[s]['methods'][m]) for s in seeds]; table[m] = v
    r = np.mean([mean4(R[s]['methods'][m], 'recall@10') for s in seeds])
    cc = np.mean([np.mean([p['code_change']['overall'] for p in R[s]['methods'][m]['periods']]) for s in seeds])
    sec = sum(p['seconds'] for p in R[seeds[0]]['methods'][m]['periods'])
    print(f"| {m} | " + " | ".join(f"{x:.4f}" for x in v) + f" | {np.mean(v):.4f} | {np.std(v, ddof=1) if len(v)>1 else 0:.4f} | {r:.4f} | {cc:.3f} | {sec:.0f} |")
for a, b in [('dact','ft_both'),('dact','ft_grm'),('reformer','ft_grm'),('ft_grm','frozen'),('ft_both','ft_tok_rt_grm'),('ft_tok_rt_grm','frozen'),('frozen','ft_tok')]:
    d = [x - y for x, y in zip(table[a], table[b])]
    print(f"{a} - {b}: " + " / ".join(f"{x:+.4f}" for x in d))
for s in seeds:
    print(s, "timing", {k: round(v) for k, v in R[s]['timing'].items()}, "best epoch p0", R[s]['period_0']['best_epoch'])
