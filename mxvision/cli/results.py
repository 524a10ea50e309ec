"""CLI commands that read finished results: ``compare`` (two evaluations of the same films)."""
from mxvision.cli.common import non_empty
from mxvision.cli.output import print_json, safe_text


def _cmd_compare(args):
    from mxvision.evaluate.compare import compare_evaluations
    r = compare_evaluations(args.eval_a, args.eval_b, out=args.out)
    if args.json:
        print_json(r)
        return
    low, high = r["ci"]
    print(f"{r['n']} films ({r['n_positive']} {safe_text(r['positive_class'])}), the same in both")
    print(f"A {safe_text(args.eval_a)}: AUC {r['auc_a']:.4f}")
    print(f"B {safe_text(args.eval_b)}: AUC {r['auc_b']:.4f}")
    print(f"A - B: {r['difference']:+.4f}, {round(100 * r['level'])}% CI [{low:+.4f}, {high:+.4f}], "
          f"z {r['z']:.3f}, p {r['p_value']:.4g} ({r['method']})")
    if args.out:
        print(f"written to {safe_text(args.out)}")


def add_parsers(sub):
    """The commands on results: compare."""
    p = sub.add_parser("compare", help="AUC difference of two evaluations of the same films "
                                       "(DeLong's paired test)",
                       description="Compare two evaluation folders written by `mxvision evaluate "
                                   "--out` on the same films (matched by id; binary tasks): the "
                                   "AUC of each and their difference A - B with its DeLong paired "
                                   "95% confidence interval and p-value.")
    p.add_argument("eval_a", type=non_empty, metavar="EVAL_A", help="first evaluation folder")
    p.add_argument("eval_b", type=non_empty, metavar="EVAL_B", help="second evaluation folder")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", type=non_empty, default=None, metavar="FILE",
                   help="also write the result as JSON to FILE")
    p.set_defaults(func=_cmd_compare)
