"""wandb in tests: no credentials, nothing written outside the test's folder, and what an offline run recorded,
read back from wandb's own run files (the transaction log `wandb sync` uploads)."""

import json
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


def offline_runs(stage_dir: Path) -> list[dict]:
    """Per offline session under stage_dir/wandb/, oldest first: its folder name, the run record (id, name,
    group, project, config), the logged history rows and the summary updates."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    runs = []
    for folder in sorted(Path(stage_dir, "wandb").glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        store = datastore.DataStore()
        store.open_for_scan(str(log))
        found = {"folder": folder.name, "history": [], "summary": {}}
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
        runs.append(found)
    return runs
