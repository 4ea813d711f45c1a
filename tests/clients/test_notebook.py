"""Progress in a notebook: a real IPython kernel (ipykernel, driven by jupyter_client as Jupyter
drives it) runs the client's progress display; stderr there is not a terminal, so the bar is a
display output updated in place, with each fold and the final fit labelled."""

import sys

import pytest
from jupyter_client.manager import start_new_kernel

CODE = """
from loradock_client.models import JobEvent
from loradock_client.progress import ProgressDisplay, in_notebook
print("in_notebook", in_notebook())
d = ProgressDisplay()
d(JobEvent("status", {"status": "running"}))
d(JobEvent("progress", {"epoch": 1, "epochs": 2, "step": 1, "steps": 4, "fold": 2, "folds": 5}))
d(JobEvent("epoch", {"epoch": 1, "fold": 2, "train_loss": 0.9, "val_loss": 0.8}))
d(JobEvent("progress", {"epoch": 2, "epochs": 2, "step": 4, "steps": 4, "folds": 5,
                        "final_fit": True}))
d.close()
"""


@pytest.fixture
def kernel():
    km, kc = start_new_kernel(kernel_name="python3", extra_arguments=[], executable=sys.executable)
    try:
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run(kc, code):
    msg_id = kc.execute(code)
    messages = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return messages


def test_the_progress_bar_updates_in_place_in_a_notebook(kernel):
    messages = run(kernel, CODE)
    errors = [m["content"] for m in messages if m["msg_type"] == "error"]
    assert not errors, errors
    stdout = "".join(
        m["content"]["text"]
        for m in messages
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )
    assert "in_notebook True" in stdout
    shown = [m for m in messages if m["msg_type"] == "display_data"]
    updates = [m for m in messages if m["msg_type"] == "update_display_data"]
    assert len(shown) == 1  # one output ...
    assert len(updates) >= 2  # ... updated in place, not a new line per event
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert all(u["content"]["transient"]["display_id"] == display_id for u in updates)
    texts = [m["content"]["data"]["text/plain"] for m in shown + updates]
    assert "\r" not in "".join(texts)  # no terminal codes
    assert "\x1b" not in "".join(texts)
    assert any("fold 2/5" in t for t in texts)
    assert "final fit" in texts[-1]
    assert "val_loss" in stdout or any("val_loss" in t for t in texts)  # the epoch line shows
