"""Prompt sets: shipped files, and public sets fetched once on the driver into a cache (here from a
server on 127.0.0.1 that the test runs), with a one-line error naming the source when offline."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from alignprop.platform import prompt_files as prompt_sets
from alignprop.platform.config import ConfigError, load_config, read_prompt_file


@pytest.fixture()
def server(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "set.json").write_text(json.dumps(["a red cat", " a blue dog ", ""]))
    # noqa: E731
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"), **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()


def test_a_public_set_is_fetched_once_then_read_from_the_cache(server, tmp_path, monkeypatch):
    base, httpd = server
    monkeypatch.setenv("ALIGNPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(prompt_sets.REMOTE_PROMPT_SETS, "remote_set.txt", (f"{base}/set.json", "json"))
    cfg = load_config("tiny-cpu", ["trainer.prompt_file=remote_set.txt", "trainer.eval_prompts=[]",
                                   "trainer.eval_prompt_file=remote_set.txt"])
    assert cfg.trainer.prompt_file == "remote_set.txt", "the name stays in the config (and the run hash)"
    assert read_prompt_file("remote_set.txt") == ["a red cat", "a blue dog"]
    httpd.shutdown()  # offline from now on: the cache serves
    assert read_prompt_file("remote_set.txt") == ["a red cat", "a blue dog"]
    assert (tmp_path / "cache" / "prompts" / "remote_set.txt").is_file()


def test_offline_fetch_is_one_line_naming_the_source_and_the_local_option(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(prompt_sets.REMOTE_PROMPT_SETS, "hps_v2_all.txt", ("http://127.0.0.1:1/hps_v2_all.txt", "text"))
    with pytest.raises(ConfigError) as err:
        load_config("tiny-cpu", ["trainer.prompt_file=hps_v2_all.txt"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("trainer.prompt_file: cannot fetch hps_v2_all.txt from "
                                                      "http://127.0.0.1:1/")
    assert "accepted: a local copy, trainer.prompt_file=/path/to/hps_v2_all.txt" in message
    assert not (tmp_path / "cache" / "prompts" / "hps_v2_all.txt").exists()


def test_the_official_held_out_animals_ship_and_load_as_eval_prompts():
    cfg = load_config("tiny-cpu", ["trainer.eval_prompts=[]", "trainer.eval_prompt_file=eval_simple_animals.txt"])
    assert read_prompt_file(cfg.trainer.eval_prompt_file) == ["snail", "hippopotamus", "cheetah", "crocodile",
                                                              "lobster", "octopus"]
    held_out, train = set(read_prompt_file("eval_simple_animals.txt")), set(read_prompt_file("simple_animals.txt"))
    assert not held_out & train, "held out"


def test_the_public_sets_name_their_sources():
    remote = prompt_sets.REMOTE_PROMPT_SETS
    assert remote["hps_v2_all.txt"][0].endswith("mihirp1998/AlignProp/main/assets/hps_v2_all.txt")
    assert {f"hpsv2_benchmark_{s}.txt" for s in ("anime", "concept-art", "paintings", "photo")} <= remote.keys()
    with pytest.raises(ConfigError, match="^trainer.eval_prompts: set at most one"):
        load_config("tiny-cpu", ["trainer.eval_prompt_file=eval_simple_animals.txt"])
