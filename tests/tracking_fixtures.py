"""wandb in tests: no credentials, nothing written outside the test's folder, and what an offline run recorded,
read back from wandb's own run files (the transaction log `wandb sync` uploads)."""

import json
import time
from pathlib import Path

WANDB_USER_SETTINGS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_PROJECT", "WANDB_ENTITY",
                       "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_BASE_URL")


def isolate_wandb(monkeypatch, tmp_path: Path) -> None:
    """A machine where wandb has never been configured: no key, no netrc entry, no mode chosen."""
    for name in WANDB_USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("NETRC", str(home / "netrc"))  # absent: no `wandb login` key
    for name, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                      ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no Sentry from a test


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _read_session(log: Path) -> tuple[dict, bool]:
    """One offline session's transaction log: its run record, history and summary, and whether its exit record
    (the last one wandb writes) is there yet."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(log))
    found, finished = {"history": [], "summary": {}}, False
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            found.update(id=run.run_id, name=run.display_name, group=run.run_group, project=run.project,
                         config={_key(i): json.loads(i.value_json) for i in run.config.update if i.key != "_wandb"})
        elif kind == "history":
            found["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            found["summary"].update({_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "exit":
            finished = True
    return found, finished


def offline_runs(stage_dir: Path, timeout_s: float = 60.0) -> list[dict]:
    """Per offline session under stage_dir/wandb/, oldest first: its folder name, the run record (id, name,
    group, project, config), the logged history rows and the summary updates.

    wandb's service process writes the transaction log behind `run.finish()` (0.25: the file can still hold only
    its 7-byte header when finish returns, and is whole a moment later), so each log is read again until its exit
    record is there, for up to `timeout_s`."""
    runs = []
    for folder in sorted(Path(stage_dir, "wandb").glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                found, finished = _read_session(log)
            except Exception:  # a record caught half-written: read again, unless time is up
                if time.monotonic() > deadline:
                    raise
            else:
                if finished or time.monotonic() > deadline:
                    break
            time.sleep(0.05)
        runs.append({"folder": folder.name, **found})
    return runs
