"""Metrics of speculative decoding: per-round records -> additive counters -> rates -> the report table.

Counters add up over rounds, turns, prompts, tasks and ranks (merge), so every rate is pooled exactly; the
task mean (macro) is reported beside the pooled value because the paper averages tasks.

- tau: committed tokens per round including the bonus, the last round cut at max_new_tokens;
- accept_length_deepspec: the same with the last round of each turn uncapped (DeepSpec's accept_len, the paper's
  tau); overall also has tau_macro (the unweighted mean of the task taus, the paper's "mean" column);
- per-slot conditional acceptance P(slot i accepted | slots < i accepted) and cumulative survival P(slots 0..i
  all accepted) (what DeepSpec prints as accept_rate@i);
- tokens/s of speculative and of plain target decoding on the same prompts (after one short untimed warm-up
  generation), their ratio (speedup), draft and verify time.
"""


def tally(rounds, K, cut=0):
    """[(proposed, accepted, committed)] of one generation -> counters. Slot i (0-based) is 'proposed' in a round
    with more than i drafts, 'reached' when also all slots before it were accepted, 'accepted' when it was kept
    (in a tree: slot i = depth i + 1 of the accepted path). cut = tokens the last round accepted past
    max_new_tokens (speculative_generate's 'cut'): counted in committed_uncapped, DeepSpec's accept length."""
    committed = sum(r[2] for r in rounds)
    c = {"rounds": len(rounds), "committed": committed, "committed_uncapped": committed + cut,
         "proposed": sum(r[0] for r in rounds),
         "slot_proposed": [0] * K, "slot_reached": [0] * K, "slot_accepted": [0] * K}
    for k, n, _ in rounds:
        for i in range(min(k, K)):
            c["slot_proposed"][i] += 1
            c["slot_reached"][i] += n >= i
            c["slot_accepted"][i] += n > i
    return c


COUNTERS = ("rounds", "committed", "committed_uncapped", "proposed", "new_tokens", "spec_s", "draft_s", "verify_s",
            "base_s", "base_tokens", "greedy_checked", "greedy_matched", "prompts", "turns")  # added up by merge
SLOT_COUNTERS = ("slot_proposed", "slot_reached", "slot_accepted")  # lists, added up slot by slot


def merge(counters):
    """Sum counter dicts: the COUNTERS, and the SLOT_COUNTERS elementwise (padded to the longest)."""
    total = {}
    for c in counters:
        for key in COUNTERS:
            if key in c:
                total[key] = total.get(key, 0) + c[key]
        for key in SLOT_COUNTERS:
            if key in c:
                a, b = total.get(key, []), c[key]
                n = max(len(a), len(b))
                total[key] = [x + y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))]
    return total


def rates(c):
    """Counters -> the reported metrics (units in the names: seconds, tokens per second)."""
    div = lambda a, b: a / b if b else None
    r = {"tau": div(c.get("committed", 0), c.get("rounds", 0)),       # the last round capped at max_new_tokens
         # DeepSpec's accept_len: the last round of a turn uncapped (all its accepted tokens + the bonus)
         "accept_length_deepspec": div(c.get("committed_uncapped", 0), c.get("rounds", 0)),
         "rounds": c.get("rounds", 0), "new_tokens": c.get("new_tokens", 0),
         "mean_proposal_len": div(c.get("proposed", 0), c.get("rounds", 0)),
         # the paper's Fig. 2: P(slot i kept | slots < i kept); trees: P(path reaches depth i+1 | reached depth i)
         "accept_rate_conditional": [div(a, n) for a, n in zip(c.get("slot_accepted", []), c.get("slot_reached", []))],
         # survival P(slots 0..i all kept), DeepSpec's printed accept_rate@i; trees: P(path reaches depth i+1 |
         # the tree is that deep)
         "accept_rate_cumulative": [div(a, n) for a, n in zip(c.get("slot_accepted", []), c.get("slot_proposed", []))],
         "tokens_per_s": div(c.get("new_tokens", 0), c.get("spec_s", 0)),
         "baseline_tokens_per_s": div(c.get("base_tokens", 0), c.get("base_s", 0)),
         "draft_s": c.get("draft_s", 0.0), "verify_s": c.get("verify_s", 0.0), "total_s": c.get("spec_s", 0.0),
         "prompts": c.get("prompts", 0), "turns": c.get("turns", 0)}
    r["speedup"] = div(r["tokens_per_s"], r["baseline_tokens_per_s"]) if r["tokens_per_s"] else None
    if c.get("greedy_checked"):
        r["greedy_match_rate"] = c.get("greedy_matched", 0) / c["greedy_checked"]  # turns equal to plain greedy
    return r


def macro(tasks, key="tau"):
    """Unweighted mean over tasks of a per-task rate (the paper's "mean" column); None when no task has it."""
    vals = [r[key] for r in tasks.values() if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def overall_rates(tasks, recs):
    """Per-task rate dicts and all prompt records -> the overall rates: pooled over rounds (long tasks weigh more),
    plus tau_macro and accept_length_deepspec_macro, the unweighted means of the task rows (the paper's "mean")."""
    r = rates(merge(recs))
    r.update(tau_macro=macro(tasks), accept_length_deepspec_macro=macro(tasks, "accept_length_deepspec"))
    return r


def format_table(tasks, overall, tree=False):
    """Tasks' rate dicts -> the stdout table. tree=True: the per-slot rates are per depth of the accepted path."""
    f = lambda x, spec="{:.2f}": "-" if x is None else spec.format(x)
    rates_label = ("per depth: P(path reaches depth i+1 | reached depth i) (cumulative: P(reaches depth i+1 | "
                   "tree that deep))" if tree else "accept_rate_conditional (cumulative = DeepSpec accept_rate@i)")
    head = f"{'task':<15}{'prompts':>8}{'new_tok':>9}{'rounds':>8}{'tau':>7}{'tau_ds':>7}" \
           f"{'depth' if tree else 'prop':>6}{'tok/s':>9}{'base':>9}{'speedup':>9}{'draft%':>8}  {rates_label}"
    lines = [head, "-" * len(head)]
    for name, r in list(tasks.items()) + [("overall", overall)]:
        busy = r["draft_s"] + r["verify_s"]
        lines.append(f"{name:<15}{r['prompts']:>8}{r['new_tokens']:>9}{r['rounds']:>8}{f(r['tau']):>7}"
                     f"{f(r.get('accept_length_deepspec')):>7}"
                     f"{f(r['mean_proposal_len'], '{:.1f}'):>6}{f(r['tokens_per_s'], '{:.1f}'):>9}"
                     f"{f(r['baseline_tokens_per_s'], '{:.1f}'):>9}{f(r['speedup'], '{:.2f}x'):>9}"
                     f"{f(100 * r['draft_s'] / busy if busy else None, '{:.0f}'):>8}  "
                     + " ".join(f(a, "{:.2f}") for a in r["accept_rate_conditional"])
                     + "  (" + " ".join(f(a, "{:.2f}") for a in r["accept_rate_cumulative"]) + ")")
    if len(tasks) > 1:  # overall pools rounds (long tasks weigh more); the paper averages the tasks
        lines.append(f"{'mean of tasks':<15}{'':>25}{f(overall.get('tau_macro')):>7}"
                     f"{f(overall.get('accept_length_deepspec_macro')):>7}")
    lines.append("tau: tokens committed per round (bonus included, the last round cut at max_new_tokens); tau_ds: "
                 "DeepSpec's accept length (the last round uncapped)"
                 + ("; mean of tasks: the unweighted mean of the task rows (the paper's mean column)"
                    if len(tasks) > 1 else ""))
    return "\n".join(lines)
