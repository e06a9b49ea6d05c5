"""txmilt-check's output for a person, written from the report dicts that --json prints as they are."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final

from txmilt.check.report import JSON
from txmilt.check.status import ExitStatus

__all__ = ["check_text", "load_text"]

_ARGUMENT_WIDTH: Final = 44
_OUTCOMES: Final = {
    ExitStatus.ACCEPTED: "the message would be delivered",
    ExitStatus.REJECTED: "the message would be rejected",
    ExitStatus.TEMPFAILED: "the message would be refused for now (temporary failure)",
    ExitStatus.DISCARDED: "the message would be accepted and thrown away",
    ExitStatus.FAILED: "no milter decided",
}


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"


def _clip(text: str, width: int = _ARGUMENT_WIDTH) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[:width - 3] + "..."


def _milter(number: int, milter: JSON) -> Iterator[str]:
    yield f"milter {number}  {milter['address']}  protocol {milter.get('version', '?')}"
    if "actions" not in milter:
        return
    macros = "; ".join(f"{stage}: {' '.join(names)}" for stage, names in milter["macros"].items())
    for label, values in (
        ("actions", " ".join(milter["actions"])), ("events", " ".join(milter["events"])),
        ("no reply", " ".join(milter["no_reply"])), ("options", " ".join(milter["options"])), ("macros", macros),
    ):
        yield f"  {label:<9} {values or '-'}"


def _reply(stage: JSON) -> str:
    if not stage["sent"]:
        return "(switched off)"
    return stage["reply"] or "-"


def _same_row(row: JSON, stage: JSON) -> bool:
    """Whether ``stage`` joins the row above (another header or body chunk answered alike)."""
    return (
        row["command"] in ("HEADER", "BODY") and stage["command"] == row["command"]
        and stage["milter"] == row["milter"] and _reply(stage) == _reply(row)
        and "smtp_reply" not in stage and "smtp_reply" not in row
    )


def _rows(stages: Sequence[JSON]) -> list[JSON]:
    """Stages with consecutive like headers and body chunks folded into one row each."""
    rows: list[JSON] = []
    for stage in stages:
        if rows and _same_row(rows[-1], stage):
            row = rows[-1]
            row["count"] += 1
            row["ms"] += stage["ms"]
            row["names"].append(stage["argument"].partition(":")[0])
            row["bytes"] += stage.get("bytes", 0)
            continue
        name = stage["argument"].partition(":")[0]
        rows.append({**stage, "count": 1, "names": [name], "bytes": stage.get("bytes", 0)})
    for row in rows:
        if row["count"] > 1:
            row["command"] = f"{row['command']} x{row['count']}"
            row["argument"] = f"{row['bytes']} bytes" if row["bytes"] else " ".join(row["names"])
    return rows


def _stage_table(stages: Sequence[JSON]) -> Iterator[str]:
    rows = _rows(stages)
    width = max([len(row["command"]) for row in rows] + [5])
    yield f"  #  {'stage':<{width}}  {'argument':<{_ARGUMENT_WIDTH}}  {'reply':<14} {'ms':>8}"
    for row in rows:
        ms = f"{row['ms']:8.2f}" if row["sent"] else " " * 8
        extra = f"  {_count(row['changes'], 'change')}" if row.get("changes") else ""
        if row.get("progress"):
            extra += f"  {row['progress']} progress"
        yield (
            f"  {row['milter']}  {row['command']:<{width}}  {_clip(row['argument']):<{_ARGUMENT_WIDTH}}"
            f"  {_reply(row):<14} {ms}{extra}"
        ).rstrip()


def _change(change: JSON) -> str:
    kind = change["change"]
    if kind == "add_header":
        return f"add header {change['header']}"
    if kind == "insert_header":
        return f"insert header at {change['index']}: {change['header']}"
    if kind == "change_header":
        return f"change header {change['name']} #{change['index']} to {change['header']}"
    if kind == "delete_header":
        return f"delete header {change['name']} #{change['index']}"
    if kind in ("change_from", "add_recipient"):
        what = "change sender to" if kind == "change_from" else "add recipient"
        return " ".join([what, change["address"], *change["args"]])
    if kind == "delete_recipient":
        return f"delete recipient {change['address']}"
    if kind == "replace_body":
        return f"replace body ({change['bytes']} bytes)"
    return f"quarantine: {change['reason']}"


def _verdict(report: JSON) -> Iterator[str]:
    verdict = report["verdict"]
    status = ExitStatus(report["exit_status"])
    where = ""
    if verdict["milter"] is not None:
        where = f" by milter {verdict['milter']}"
        if verdict["stage"]:
            argument = f" ({_clip(verdict['argument'])})" if verdict["argument"] else ""
            where += f" at {verdict['stage']}{argument}"
    yield f"verdict   {verdict['reply']}{where}: {_OUTCOMES[status]} (exit status {int(status)})"
    for line in verdict["smtp_reply"]:
        yield f"          {line}"
    for refused in report["refused_recipients"]:
        reply = " ".join(refused["smtp_reply"]) or refused["reply"]
        yield f"refused   {refused['recipient']}: {reply}"


def check_text(report: JSON) -> str:
    """The report of one checked message, for a person."""
    lines = [f"txmilt-check: {_count(len(report['milters']), 'milter')}, {report['profile']} profile"]
    for number, milter in enumerate(report["milters"], 1):
        lines += _milter(number, milter)
    client, envelope = report["client"], report["envelope"]
    lines += [
        "",
        f"client    {client['name']} [{client['address']}], HELO {client['helo']}",
        f"envelope  from {envelope['sender']} to {' '.join(envelope['recipients'])}",
        "",
        *_stage_table(report["stages"]),
        "",
        *_verdict(report),
    ]
    if report["changes"]:
        lines += ["", "changes"]
        lines += [
            f"  milter {change['milter']}  {_change(change)}".replace("\n", "\n" + " " * 12)
            for change in report["changes"]
        ]
    result = report["result"]
    if report["verdict"]["delivered"]:
        lines += [
            "",
            f"result    from {result['sender']} to {' '.join(result['recipients'])}",
        ]
        if result["quarantine"] is not None:
            lines.append(f"          held in quarantine: {result['quarantine']}")
        lines += ["", result["diff"] or "the milters left the message as it was"]
    lines += ["", f"time      {report['ms']:.2f} ms in the milters"]
    return "\n".join(lines) + "\n"


def load_text(report: JSON) -> str:
    """The report of a load run, for a person."""
    latency = report["latency_ms"]
    verdicts = ", ".join(f"{name} {count}" for name, count in report["verdicts"].items()) or "none"
    errors = ", ".join(f"{kind} {count}" for kind, count in report["errors"].items()) or "none"
    lines = [
        f"txmilt-check load: {_count(report['count'], 'message')} to {_count(len(report['milters']), 'milter')},"
        f" {report['profile']} profile, concurrency {report['concurrency']},"
        f" {report['messages_per_connection']} per connection",
        f"  time        {report['seconds']:.2f} s",
        f"  rate        {report['messages_per_second']:.1f} messages/s ({report['answered']} answered)",
    ]
    if latency:
        lines.append(
            f"  latency ms  p50 {latency['p50']:.2f}  p90 {latency['p90']:.2f}  p99 {latency['p99']:.2f}"
            f"  max {latency['max']:.2f}"
        )
    lines += [f"  verdicts    {verdicts}", f"  errors      {errors}"]
    for kind, example in report["error_examples"].items():
        lines.append(f"    {kind}: {example}")
    lines.append(f"  exit status {report['exit_status']}")
    return "\n".join(lines) + "\n"
