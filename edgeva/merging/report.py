"""The merge report: JSON-able dict and its human-readable text."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .merger import IncrementalMerger, MergeState


def build_report(merger: IncrementalMerger, state: MergeState, setup_s: float, config: str = "",
                 total_budget_s: float | None = None) -> dict[str, Any]:
    """The final agreement is measured again through each model's own `predict` (the path the
    daemon runs) on the held-out frames, with a Wilson 95 % lower bound."""
    import time

    t0 = time.monotonic()
    final = merger.check.through_predict()
    check_s = time.monotonic() - t0
    lower = merger.check.lower_bounds(final)
    memory = merger.memory()
    cuda = merger.cuda_memory()
    analysis = merger.analysis
    queries = {q.query_id: {"model": q.model_key, "camera": q.camera, "target": q.target,
                            "input_size": merger.workload.models[q.model_key].input_size,
                            "heldout_frames": sum(len(r) for r in merger.check.references[q.query_id]),
                            "cameras_checked": merger.check.checked_cameras(q.query_id),
                            "agreement_before": 1.0, "agreement_after": round(final[q.query_id], 4),
                            "lower_bound_after": round(lower[q.query_id], 4),
                            "met": merger.check.target_met(q.query_id, final[q.query_id]),
                            "judged_on": merger.settings.accept_on}
               for q in merger.workload.queries}
    accepted_bytes = state.bytes_saved
    return {
        "config": config,
        "stopped": merger.stopped_reason,
        "time": {"setup_s": round(setup_s, 2), "merge_s": round(state.elapsed_s, 2), "final_check_s": round(check_s, 2),
                 "budget_s": total_budget_s if total_budget_s is not None else merger.settings.time_budget_s},
        "settings": asdict(merger.settings),
        "models": list(merger.workload.models),
        "candidate_groups": len(analysis.groups),
        "analysed_bytes_saved_max": analysis.total_bytes_saved,
        "groups_merged": len({(g.signature, g.occurrence) for g in state.accepted}),
        "shared_parts": len(state.accepted),     # a group backed off to subsets counts once per subset
        "analysed_bytes_saved": accepted_bytes,
        "memory": memory.to_stats(),
        "memory_cuda": cuda.to_stats() if cuda else None,
        "queries": queries,
        "accepted": [{"id": g.group_id, "layer": g.signature.describe(), "models": list(g.models),
                      "bytes_saved": g.bytes_saved} for g in state.accepted],
        "residual_layers": [dict(r.to_json(), bytes_saved=r.bytes_saved) for r in state.residuals],
        "attempts": [asdict(a) for a in state.attempts],
        "backed_off": sum(1 for a in state.attempts if a.outcome.startswith("backed off")),
        "skipped": sum(1 for a in state.attempts if a.outcome == "skipped"),
        "queued_left": len(state.queue),
    }


def format_report(report: dict[str, Any]) -> str:
    mem = report["memory"]
    t = report["time"]
    lines = [
        f"merge of {report['config'] or 'workload'}: {report['stopped']} after {t['merge_s']:.1f}s "
        f"(setup {t['setup_s']:.1f}s, budget {t['budget_s'] if t['budget_s'] is not None else 'none'})",
        f"groups merged: {report['groups_merged']} of {report['candidate_groups']} candidates "
        f"({report['shared_parts']} shared parts); "
        f"{len(report['attempts'])} trials, {report['backed_off']} backed off, {report['skipped']} skipped, "
        f"{report['queued_left']} left in the queue; "
        f"{len(report.get('residual_layers', []))} layers held as base + int8 residual",
        f"weights resident (measured, distinct storages): {_mib(mem['bytes_before'])} -> {_mib(mem['bytes_after'])}, "
        f"saved {_mib(mem['bytes_saved'])} ({100 * mem['saved_fraction']:.1f}%); "
        f"analysed saving of the merged groups {_mib(report['analysed_bytes_saved'])} "
        f"(all candidates: {_mib(report['analysed_bytes_saved_max'])})",
    ]
    if report.get("memory_cuda"):
        c = report["memory_cuda"]
        lines.append(f"CUDA allocated: {_mib(c['bytes_before'])} -> {_mib(c['bytes_after'])}")
    lines.append("")
    settings = report.get("settings", {})
    lines.append("final agreement with the unmerged models, through predict on the held-out frames "
                 f"(mean on the worst of the cameras checked ({settings.get('check_on', 'own')}); Wilson 95 % "
                 f"lower bound; a target is met by the {settings.get('accept_on', 'mean')}):")
    lines.append(f"{'query':<24} {'size':>5} {'frames':>6} {'target':>6} {'after':>7} {'lower':>7}  met")
    for qid, q in report["queries"].items():
        lines.append(f"{qid:<24} {q.get('input_size', '-'):>5} {q.get('heldout_frames', '-'):>6} {q['target']:>6.3f} "
                     f"{q['agreement_after']:>7.3f} {q.get('lower_bound_after', float('nan')):>7.3f}  "
                     f"{'yes' if q['met'] else 'NO'}")
    lines.append("")
    lines.append("trials (saved: bytes the step would save; agreement per query right after sharing -> after "
                 "retraining, lower bound in brackets):")
    for a in report["attempts"]:
        fail = f" failing: {', '.join(a['failing_queries'])}" if a["failing_queries"] else ""
        fail += f"; {a['note']}" if a.get("note") else ""
        trained = sorted(set(a.get("trained_from", {}).values()))
        scope = (f", retrained from {'/'.join(trained)} ({_mib(a.get('trained_bytes', 0))})"
                 if a["train_steps"] else "")
        lines.append(f"  {a['index'] + 1:>3} [{a['origin']}] {a['layer']} [{', '.join(a.get('layers', []))}] "
                     f"saves {_mib(a['bytes_saved'])}: {a['outcome']} after {a['train_steps']} steps{scope}, "
                     f"{a['seconds']:.1f}s{fail}")
        lows = a.get("lower_bound_final", {})
        per_query = ", ".join(f"{q} {a['agreement_shared'].get(q, float('nan')):.3f}->{v:.3f} [{lows.get(q, float('nan')):.3f}]"
                              for q, v in a["agreement_final"].items())
        lines.append(f"        {per_query}")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
