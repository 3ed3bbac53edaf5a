"""The live table of the default run never shows an epoch above its budget (it showed `m4 epoch 23/8` before the
budget was the budget, when the default had four modules): ``format_line`` over the statuses real trainers report while the default stack trains.

The default preset's schedule (async, 8 epochs, settle 2, tracking, a version every epoch) on tiny data, its two
trainers run in process (threads, no Ray), their statuses sampled the way the scheduler polls them.
"""

from __future__ import annotations

import re
import threading
import time

from pipeline.planning.config import load_config
from pipeline.run.driver import prepare_run
from pipeline.run.progress import format_line
from schemas.status import ModuleStatus
from tests.conftest import TINY_NORB
from workers.trainer import ModuleTrainer

EPOCH = re.compile(r" epoch (\d+)/(\d+|\?) ")


def test_default_run_progress_never_passes_the_budget(tmp_path):
    cfg = load_config(None, TINY_NORB + [
        "train.batch_size=16", "train.max_steps_per_epoch=1", "schedule.poll_seconds=0.02",
        "stack.m1.layers.0.channels=8", "stack.m1.layers.2.channels=8", "stack.m2.layers.0.channels=8",
        "stack.m2.layers.3.features=16"], str(tmp_path))
    assert cfg.train.epochs == 8 and cfg.schedule.settle_epochs == 2 and cfg.schedule.mode == "async"
    store, _, _ = prepare_run(cfg, "r")
    trainers = [ModuleTrainer(store.uri, "r", name, cfg.model_dump(mode="json")) for name in cfg.stack]
    threads = [threading.Thread(target=t.run, daemon=True) for t in trainers]
    for t in threads:
        t.start()
    lines, deadline = [], time.time() + 240
    while any(t.is_alive() for t in threads) and time.time() < deadline:
        lines += [format_line(ModuleStatus.model_validate(t.status())) for t in trainers]
        time.sleep(0.02)
    assert not any(t.is_alive() for t in threads), "the default stack did not finish in 240 s"
    final = [format_line(ModuleStatus.model_validate(t.status())) for t in trainers]
    shown = [(line, *m.groups()) for line in lines + final if (m := EPOCH.search(line))]
    assert len(shown) == len(lines + final), "a line without 'epoch X/Y'"
    # "?" only before a trainer has read its config (epoch 0 of a module still being created)
    assert all(done == "0" for _, done, planned in shown if planned == "?")
    over = [line for line, done, planned in shown if planned != "?" and int(done) > int(planned)]
    assert not over, over[:3]
    assert all(EPOCH.search(line).groups() == ("8", "8") and " final " in line for line in final), final
    # The upper module waited for its upstream at times (the settle epochs), and said so on its line.
    assert any(line.startswith("m2") and "waiting_upstream" in line for line in lines)
