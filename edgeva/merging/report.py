"""The merge report: JSON-able dict and its human-readable text."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .merger import IncrementalMerger, MergeState


def build_report(merger: IncrementalMerger, state: MergeState, setup_s: float, config: str = "") -> dict[str, Any]:
    final = merger.agreements()
    memory = merger.memory()
    cuda = merger.cuda_memory()
    analysis = merger.analysis
    queries = {q.query_id: {"model": q.model_key, "camera": q.camera, "target": q.target,
                            "agreement_before": 1.0, "agreement_after": round(final[q.query_id], 4),
                            "met": final[q.query_id] >= q.target}
               for q in merger.workload.queries}
    accepted_bytes = sum(g.bytes_saved for g in state.accepted)
    return {
        "config": config,
        "stopped": merger.stopped_reason,
        "time": {"setup_s": round(setup_s, 2), "merge_s": round(state.elapsed_s, 2),
                 "budget_s": merger.settings.time_budget_s},
        "settings": asdict(merger.settings),
        "models": list(merger.workload.models),
        "candidate_groups": len(analysis.groups),
        "analysed_bytes_saved_max": analysis.total_bytes_saved,
        "groups_merged": len(state.accepted),
        "analysed_bytes_saved": accepted_bytes,
        "memory": memory.to_stats(),
        "memory_cuda": cuda.to_stats() if cuda else None,
        "queries": queries,
        "accepted": [{"id": g.group_id, "layer": g.signature.describe(), "models": list(g.models),
                      "bytes_saved": g.bytes_saved} for g in state.accepted],
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
        f"groups merged: {report['groups_merged']} of {report['candidate_groups']} candidates; "
        f"{len(report['attempts'])} trials, {report['backed_off']} backed off, {report['skipped']} skipped, "
        f"{report['queued_left']} left in the queue",
        f"weights resident (measured, distinct storages): {_mib(mem['bytes_before'])} -> {_mib(mem['bytes_after'])}, "
        f"saved {_mib(mem['bytes_saved'])} ({100 * mem['saved_fraction']:.1f}%); "
        f"analysed saving of the merged groups {_mib(report['analysed_bytes_saved'])} "
        f"(all candidates: {_mib(report['analysed_bytes_saved_max'])})",
    ]
    if report.get("memory_cuda"):
        c = report["memory_cuda"]
        lines.append(f"CUDA allocated: {_mib(c['bytes_before'])} -> {_mib(c['bytes_after'])}")
    lines.append("")
    lines.append(f"{'query':<24} {'target':>6} {'before':>7} {'after':>7}  met")
    for qid, q in report["queries"].items():
        lines.append(f"{qid:<24} {q['target']:>6.3f} {q['agreement_before']:>7.3f} {q['agreement_after']:>7.3f}  "
                     f"{'yes' if q['met'] else 'NO'}")
    lines.append("")
    lines.append("trials:")
    for a in report["attempts"]:
        worst = min(a["agreement_final"].values()) if a["agreement_final"] else 1.0
        fail = f" failing: {', '.join(a['failing_queries'])}" if a["failing_queries"] else ""
        lines.append(f"  {a['index'] + 1:>3} [{a['origin']}] {a['layer']} ({_mib(a['bytes_saved'])}): {a['outcome']}; "
                     f"min agreement {worst:.3f} after {a['train_steps']} steps, {a['seconds']:.1f}s{fail}")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
