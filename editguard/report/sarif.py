"""SARIF 2.1.0: one rule per finding type, the shard file as artifact, the tensor as logical location.

Every command answers in SARIF: scan and reverse with their findings; the others with no results and their
JSON answer as the run's properties; a failed command with a failed invocation and its error as a tool
notification, so a CI step that collects SARIF always gets a valid log that says what happened."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import quote

from .. import __version__
from ..audit.findings import RULES, Finding

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVEL_DEFAULT = {"EG001": "error", "EG002": "error", "EG003": "note", "EG004": "warning", "EG005": "error", "EG010": "warning",
                 "EG011": "warning", "EG012": "error",
                 "EG020": "error", "EG021": "error", "EG030": "error"}


def to_sarif(findings: list[Finding], model: str, source: str | None, summary: dict,
             skipped: dict[str, str] | None = None) -> dict:
    """`source`: the model folder, or the one file the user's weights are (a .gguf, converted elsewhere: its
    findings belong to it, not to a cache folder); `skipped`: tests that did not run and why, each a
    warning notification, so a clean log says what it did not look at."""
    single = Path(source).resolve() if source and Path(source).is_file() else None
    model_dir = single.parent if single else Path(source).resolve() if source else None
    base_id, base_dir = _uri_base(model_dir)
    results = []
    for f in findings:
        location: dict = {}
        artifact = Path(single.name if single else f.file or "config.json")
        # fsencode: a file name that is not UTF-8 (kept by Python as surrogates) is quoted byte by byte
        uri = quote(os.fsencode((model_dir / artifact).relative_to(base_dir).as_posix() if model_dir
                                else artifact.as_posix()))
        location["physicalLocation"] = {"artifactLocation": {"uri": uri, "uriBaseId": base_id}}
        if f.tensor or f.layer is not None:
            name = f.tensor or f"layer {f.layer}"
            location["logicalLocations"] = [{"name": name, "fullyQualifiedName": name, "kind": "member"}]
        properties = {k: v for k, v in {"score": f.score, "threshold": f.threshold, "layer": f.layer}.items()
                      if v is not None}
        if f.facts:
            properties["facts"] = f.facts
        results.append({
            "ruleId": f.rule, "ruleIndex": list(RULES).index(f.rule), "level": f.severity,
            "message": {"text": f.message}, "locations": [location], "properties": properties,
            "partialFingerprints": {"editguardFinding/v1": _fingerprint(f, uri)},
        })
    invocation: dict = {"executionSuccessful": True}
    if skipped:
        invocation["toolExecutionNotifications"] = [{"level": "warning", "message": {"text": f"{name} skipped: {why}"}}
                                                    for name, why in skipped.items()]
    run = _run(results, invocation, {"model": model, **summary})
    if source:
        # as_uri percent-encodes: a folder named "rome edit#1" must not read as a fragment
        run["originalUriBaseIds"] = {base_id: {"uri": base_dir.as_uri().rstrip("/") + "/"}}
    return _log(run)


def answer_sarif(command: str | None, answer) -> dict:
    """A command without findings (inspect, edit, train, lock ...): no results, its JSON answer kept."""
    return _log(_run([], {"executionSuccessful": True}, {"command": command, "answer": answer}))


def failure_sarif(command: str | None, message: str, exit_code: int) -> dict:
    """A command that failed: no results (it found nothing, it did not finish), the error as a notification."""
    invocation = {"executionSuccessful": False, "exitCode": exit_code,
                  "toolExecutionNotifications": [{"level": "error", "message": {"text": message}}]}
    return _log(_run([], invocation, {"command": command} if command else {}))


def _run(results: list[dict], invocation: dict, properties: dict) -> dict:
    rules = [{
        "id": rule, "name": name,
        "shortDescription": {"text": name.replace("-", " ")},
        "fullDescription": {"text": description},
        "defaultConfiguration": {"level": LEVEL_DEFAULT[rule]},
        "helpUri": "https://github.com/editguard/editguard#what-scan-looks-at",  # the README table of tests and rules
    } for rule, (name, description) in RULES.items()]
    return {
        "tool": {"driver": {"name": "editguard", "version": __version__, "semanticVersion": __version__,
                            "informationUri": "https://github.com/editguard/editguard", "rules": rules}},
        "results": results,
        "invocations": [invocation],
        "properties": properties,
    }


def _log(run: dict) -> dict:
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}


def _uri_base(model_dir: Path | None) -> tuple[str, Path | None]:
    """A model inside the checkout (`$GITHUB_WORKSPACE` in a GitHub workflow, else the working directory)
    gets repository-relative URIs under %SRCROOT%, which code scanning places on the repository's files
    (a step's `working-directory` below the checkout changes nothing); any other (a hub snapshot in the
    cache) is relative to the model folder."""
    if model_dir is None:
        return "MODEL", None
    for root in (os.environ.get("GITHUB_WORKSPACE"), os.getcwd()):
        if root and model_dir.is_relative_to(Path(root).resolve()):
            return "%SRCROOT%", Path(root).resolve()
    return "MODEL", model_dir


def _fingerprint(f: Finding, uri: str) -> str:
    """Stable across runs (no scores), so code scanning follows one finding from upload to upload; the
    prompt keeps apart the findings of one subject's several probes (EG011, EG020, EG021 are per prompt)."""
    fact = f.facts[0] if f.facts else {}
    key = "|".join(str(x) for x in (f.rule, uri, f.tensor or "", f.layer, fact.get("subject", ""),
                                    fact.get("prompt", "")))
    return hashlib.sha256(key.encode()).hexdigest()[:32]
