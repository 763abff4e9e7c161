"""Break verdict-deciding behaviours on purpose, one at a time, and list the tests that catch each (issue 18).

Each break is a one-line string replacement in a scratch copy of the repository (never in the tree itself),
asserted to match exactly once; the named tests run against it and the failing ones are recorded.

    .venv/bin/python bench/breaks.py [SUBSTRING ...]     # only the breaks whose name contains a substring
Writes bench/work/breaks.json (bench/results/breaks.md holds the table from the last full run).
"""
import json, shutil, subprocess, sys, re, tempfile
from pathlib import Path
SRC = Path(__file__).resolve().parent.parent; DST = Path(tempfile.gettempdir()) / "onnxrepair-breaks"
OUT = SRC / "bench" / "work" / "breaks.json"
BREAKS = [
  ("stats gate: calibrated threshold never applied", "onnxrepair/methods/deeppatch.py", "    gate.stats_bias.sub_(thr)\n", "    pass  # BREAK\n", "tests/test_gates.py tests/test_deeppatch.py"),
  ("disagreement gate: score sign flipped", "onnxrepair/graph/patching.py", "        return self.sign * (self.boundary - stat)\n", "        return -self.sign * (self.boundary - stat)\n", "tests/test_gates.py tests/test_deeppatch.py"),
  ("logistic gate: score sign flipped", "onnxrepair/graph/patching.py", "        return ((feat - self.feat_mean) / self.feat_std) @ self.weight + self.bias\n", "        return -(((feat - self.feat_mean) / self.feat_std) @ self.weight + self.bias)\n", "tests/test_gates.py tests/test_deeppatch.py"),
  ("evaluate: blurred copies are the clean images", "onnxrepair/evaluate.py", "xb = gaussian_blur(unit_dev, sg)", "xb = unit_dev", "tests/test_evaluate_strict.py tests/test_evaluate.py"),
  ("EOD computed from FPR", "onnxrepair/metrics.py", "return _tpr_fpr(y_true, y_pred, unpriv, favorable)[0] - _tpr_fpr(y_true, y_pred, priv, favorable)[0]", "return _tpr_fpr(y_true, y_pred, unpriv, favorable)[1] - _tpr_fpr(y_true, y_pred, priv, favorable)[1]", "tests/test_metrics.py"),
  ("AAOD without its FPR term", "onnxrepair/metrics.py", "return 0.5 * (abs(fu - fp) + abs(tu - tp))", "return 0.5 * abs(tu - tp)", "tests/test_metrics.py"),
  ("AAOD without its FPR term (variant: abs(TPR gap) alone)", "onnxrepair/metrics.py", "return 0.5 * (abs(fu - fp) + abs(tu - tp))", "return abs(tu - tp)", "tests/test_metrics.py"),
  ("retention limit read as a fraction (limit / 100)", "onnxrepair/repair.py", '"passed": drop <= limit_points + 1e-9', '"passed": drop <= limit_points / 100 + 1e-9', "tests/test_safety_paths.py"),
  ("validation ignores argmax agreement", "onnxrepair/validate.py", "ok = not fails.any() and (agree is None or agree >= min_argmax)", "ok = not fails.any()", "tests/test_safety_paths.py tests/test_roundtrip.py"),
  ("repair writes despite disagreement", "onnxrepair/repair.py", 'ok = fidelity["passed"] and ((retention["passed"] and latency_ok) or force)', 'ok = (retention["passed"] and latency_ok) or force', "tests/test_safety_paths.py", 'if not fidelity["passed"]:\n            raise', 'if False:\n            raise'),
  ("retention drop as a fraction", "onnxrepair/repair.py", "drop = (acc_before - acc_after) * 100.0", "drop = (acc_before - acc_after)", "tests/test_safety_paths.py"),
  ("deeppatch returns its input", "onnxrepair/methods/deeppatch.py", "    return MethodOutput(model=gm.eval(), info=info, summary=summary)", "    return MethodOutput(model=inputs.model, info=info, summary=summary)", "tests/test_methods_strict.py::test_method_helps_on_its_fixture[deeppatch]"),
  ("fmt returns its input", "onnxrepair/methods/fmt.py", "    return MethodOutput(res.model.cpu().eval(), res.info, summary=transform_summary(res.info))", "    return MethodOutput(inputs.model, res.info, summary=transform_summary(res.info))", "tests/test_methods_strict.py::test_method_helps_on_its_fixture[fmt]"),
  ("dare returns its input", "onnxrepair/methods/dare.py", "    return MethodOutput(res.model.cpu().eval(), info, summary)", "    return MethodOutput(inputs.model, info, summary)", "tests/test_methods_strict.py::test_method_helps_on_its_fixture[dare]"),
  ("dare: lr/epoch selection reversed (worst kept)", "onnxrepair/methods/dare.py", "        value = -(clean + adv) / 2\n", "        value = (clean + adv) / 2\n", "tests/test_methods_strict.py::test_method_helps_on_its_fixture[dare] tests/test_dare.py"),
  ("archrepair returns its input", "onnxrepair/methods/archrepair.py", "    return MethodOutput(model=model.eval(), info=info, summary=summary)", "    return MethodOutput(model=inputs.model, info=info, summary=summary)", "tests/test_methods_strict.py::test_method_helps_on_its_fixture[archrepair]"),
  ("gate never routes (always the original path)", "onnxrepair/graph/patching.py", "        return self.score(orig, delta) > 0\n", "        return self.score(orig, delta) > 1e30\n", "tests/test_gates.py tests/test_methods_strict.py::test_method_helps_on_its_fixture[deeppatch]"),
  ("torchrun: gradients not all-reduced (each rank steps on its own slice)", "onnxrepair/distributed.py", "    dist.all_reduce(flat)\n", "    pass  # BREAK\n", "tests/test_distributed.py"),
  ("torchrun: batches not sharded (every rank trains on every row)", "onnxrepair/distributed.py", "        lo, hi = shard_range(len(batch))\n        return batch[lo:hi]\n", "        return batch  # BREAK\n", "tests/test_distributed.py"),
  ("fidelity check with TF32 left as the session has it", "onnxrepair/validate.py", "    with torch.no_grad(), _full_fp32():\n", "    with torch.no_grad():\n", "tests/test_validate_tf32.py"),
  ("issue14 --max-latency-ratio never enforced", "onnxrepair/repair.py", "latency_ok = max(measured.values()) <= float(limit)", "latency_ok = True", "tests/test_deeppatch_switch.py::test_max_latency_ratio_refuses_a_file_over_it tests/test_deeppatch_switch.py::test_max_latency_ratio_met_is_written_with_the_measurement"),
  ("issue14 switch overlay: the any-routed If's branches swapped", "converters/switch.py", "then_branch=g_some, else_branch=g_none", "then_branch=g_none, else_branch=g_some", "tests/test_deeppatch_switch.py"),
  ("issue15 reject-option: the band ignored for the boosted group", "onnxrepair/methods/reject_option.py", "fav = (fav | (band & ((col - self.boosted).abs() < 1e-6)))", "fav = (fav | ((col - self.boosted).abs() < 1e-6))", "tests/test_fairness_postprocess.py"),
  ("issue15 drop-attribute: the column zeroed instead of set to the privileged value", "onnxrepair/methods/drop_attribute.py", 'self.register_buffer("fill", (1.0 - keep) * float(value))', 'self.register_buffer("fill", (1.0 - keep) * 0.0)', "tests/test_fairness_postprocess.py"),
  ("issue15 fmt --free-biases: biases outside the slice still restored", "onnxrepair/methods/fmt.py", "                    mask[n] = torch.ones_like(p, dtype=torch.bool)\n", "                    pass\n", "tests/test_fmt.py::test_fmt_artefact_options_free_biases_and_pairs_per_row tests/test_fmt.py::test_slice_counts_ceil_and_artefact"),
  ("issue15 fmt --pairs-per-row ignored", "onnxrepair/methods/fmt.py", "len(x) if config.pairs_per_row else config.n_pairs", "config.n_pairs", "tests/test_fmt.py::test_fmt_artefact_options_free_biases_and_pairs_per_row"),
  ("issue15 slice counts: artefact computed as the ceilings", "onnxrepair/localize/slices.py", "return min(w, int(top_ratio * w)), min(w, round(keep_ratio * w))", "return min(w, max(1, math.ceil(top_ratio * w))), min(w, max(1, math.ceil(keep_ratio * w)))", "tests/test_fmt.py::test_fmt_artefact_options_free_biases_and_pairs_per_row tests/test_fmt.py::test_slice_counts_ceil_and_artefact"),
  ("issue15 aif360 min-max fitted on every row, test rows included", "onnxrepair/data/tabular.py", "ref = v if self.fit is None else v[self.fit]", "ref = v", "tests/test_tabular.py"),
]
def copy():
    if DST.exists(): shutil.rmtree(DST)
    shutil.copytree(SRC, DST, ignore=shutil.ignore_patterns(".git", "__pycache__", "mutants", ".pytest_cache", ".venv*", "work"))
only = sys.argv[1:]
OUT.parent.mkdir(parents=True, exist_ok=True)
results = json.loads(OUT.read_text()) if OUT.exists() else {}
copy()
for b in BREAKS:
    name, f, old, new, tests = b[:5]
    if only and not any(o in name for o in only): continue
    p = DST / f; orig = p.read_text(); s = orig
    if old is None:  # fmt: return the input model from the method's entry point
        m = re.search(r"\n    return MethodOutput\(model=([^,]+),", s); assert m, name
        s = s[:m.start(1)] + "inputs.model" + s[m.end(1):]
    else:
        assert s.count(old) == 1, (name, s.count(old)); s = s.replace(old, new)
    if len(b) > 5:
        assert s.count(b[5]) == 1, name; s = s.replace(b[5], b[6])
    p.write_text(s)
    r = subprocess.run(f"cd {DST} && PYTHONPATH={DST} {sys.executable} -m pytest {tests} -q -p no:cacheprovider 2>&1 | grep -E '^FAILED|^ERROR|passed|failed'", shell=True, capture_output=True, text=True)
    p.write_text(orig)
    failed = [l.split(" - ")[0].replace("FAILED ", "") for l in r.stdout.splitlines() if l.startswith(("FAILED", "ERROR"))]
    results[name] = {"file": f, "tests_run": tests, "failed": failed, "summary": r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""}
    print(name, "->", len(failed), "failing:", failed, flush=True)
    OUT.write_text(json.dumps(results, indent=1))
