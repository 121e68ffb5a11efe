"""The command line on bad input: one line naming the problem, exit status 2, no traceback, nothing
created (`--debug` keeps the traceback)."""

import http.server
import json
import threading

import pytest

from personaagent.app.cli import main

GOOD_ROW = {"user_id": "u", "input": "x", "output": "yes"}


def _lamp(tmp_path, profile_item):
    (tmp_path / "dev_questions.json").write_text(json.dumps(
        [{"id": "1", "input": "What is the score of this review? review: good", "profile": [profile_item]}]))
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_3", "golds": [{"id": "1", "output": "5"}]}))
    return tmp_path / "dev_questions.json"


def _bad_inputs(tmp_path):
    """(arguments, what the error line must name) for each bad input an operator meets."""
    store = tmp_path / "store"
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(json.dumps(GOOD_ROW).encode() + b"\n" + b'{"user_id": "caf\xe9", "input": "x"}\n')
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(GOOD_ROW) + "\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    lamp_dir = tmp_path / "lamp"
    lamp_dir.mkdir()
    no_outputs = tmp_path / "alone"
    no_outputs.mkdir()
    (no_outputs / "dev_questions.json").write_text("[]")
    return [
        (["compile", "--data", str(_lamp(lamp_dir, "just a string")), "--store", str(store)], "profile[0] must be an object"),
        (["compile", "--data", str(not_utf8), "--store", str(store)], "latin1.jsonl: record line 2: not UTF-8"),
        (["compile", "--data", str(log), "--task", "banana", "--store", str(store)], "not 'banana'"),
        (["compile", "--data", str(no_outputs), "--store", str(store)], "no outputs file beside it (dev_outputs.json)"),
        (["compile", "--data", str(log), "--store", str(a_file)], f"store {a_file}: is a file"),
        (["ask", "--store", str(store), "--user", "u", "hi"], f"{store}: no such store"),
    ]


def test_every_bad_input_gets_one_line_naming_it_and_exit_2(tmp_path, capsys):
    for argv, named in _bad_inputs(tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and named in err, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "store").exists()  # no bad input created the store


def test_debug_keeps_the_traceback(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(GOOD_ROW))
    with pytest.raises(ValueError, match="banana"):
        main(["--debug", "compile", "--data", str(log), "--task", "banana", "--store", str(tmp_path / "s")])


def test_compile_reaches_the_lm_served_at_api_base(tmp_path):
    """`--api-base` is where `compile` sends its LM calls, not only where `ask` and `serve` do (here a
    minimal OpenAI-compatible server on 127.0.0.1, with no API key: an unaligned compile's one call
    writes the profile)."""
    asked = []

    class Served(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append(request["model"])
            profile = {"summary": "Says yes.", "preferences": ["short answers"]}  # the profile's fields
            body = json.dumps({"id": "1", "object": "chat.completion", "created": 0, "model": request["model"],
                               "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                   "role": "assistant", "content": json.dumps(profile)}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Served)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        log = tmp_path / "log.jsonl"
        log.write_text("\n".join(json.dumps({"user_id": "u", "input": f"review {i}", "output": "yes"}) for i in range(3)))
        argv = ["compile", "--data", str(log), "--task", "classification", "--store", str(tmp_path / "store"),
                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--optimizer", "unaligned",
                "--lm", "openai/served", "--api-base",
                f"http://127.0.0.1:{server.server_address[1]}/v1"]
        assert main(argv) == 0
        assert asked and set(asked) == {"served"}  # the profile's call, at the server named
    finally:
        server.shutdown()
