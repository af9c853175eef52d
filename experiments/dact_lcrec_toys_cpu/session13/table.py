import json, sys, numpy as np
r = json.load(open(sys.argv[1]))
p0 = r["period_0"]["test"]
print(f"| period 0 (test) | | | | | {p0['ndcg@10']:.4f} | {p0['recall@10']:.4f} | | {r['period_0']['seconds']:.0f} |")
for m, v in r["methods"].items():
    rows = v["periods"]
    n = [x["test"]["ndcg@10"] for x in rows]
    rr = [x["test"]["recall@10"] for x in rows]
    cc = np.mean([x["code_change"]["overall"] for x in rows])
    sec = sum(x["seconds"] for x in rows)
    print(f"| {m} | " + " | ".join(f"{x:.4f}" for x in n) + f" | {np.mean(n):.4f} | {np.mean(rr):.4f} | {cc:.3f} | {sec:.0f} |")
print(r["timing"])
