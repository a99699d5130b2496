import json

import pytest

from jacobian_lab.experiments.runner import load_records, prepare_output_dir, run_sweep


def test_interrupted_sweep_resumes_without_redoing_finished_work(tmp_path):
    path = tmp_path / "sweep.jsonl"
    configs = [{"name": f"c{i}", "i": i} for i in range(4)]
    calls = []

    def compute(config):
        calls.append(config["i"])
        if config["i"] == 2 and len(calls) == 3:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the third configuration
        return {"square": config["i"] ** 2}

    with pytest.raises(KeyboardInterrupt):
        list(run_sweep(configs, compute, path, log=lambda msg: None))
    assert calls == [0, 1, 2]
    assert len(load_records(path)) == 2

    messages = []
    records = list(run_sweep(configs, compute, path, log=messages.append))
    assert calls == [0, 1, 2, 2, 3]  # only the unfinished configurations ran again
    assert [r["result"]["square"] for r in records] == [0, 1, 4, 9]
    assert messages[0].startswith("resuming: 2 of 4")
    assert any("left" in m for m in messages)  # progress with time remaining


def test_truncated_last_line_is_ignored(tmp_path):
    path = tmp_path / "sweep.jsonl"
    path.write_text(json.dumps({"config": {"a": 1}, "result": 1}) + "\n" + '{"config": {"a"')
    assert list(load_records(path)) == [json.dumps({"a": 1})]


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write to output folder"):
        prepare_output_dir(blocker / "sub")
