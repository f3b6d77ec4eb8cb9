"""Programs XLA builds after the engine's warm-up are counted and logged."""

import logging
import time

import jax
import numpy as np

from xla_inference.runner import compile_counter

LOGGER = "xla_inference.runner.compile_counter"


def _new_program():
    """Run a program this process (and the persistent cache) has never seen."""
    unique = float(time.time_ns() % 1_000_003)
    jax.jit(lambda x: x * unique + 1.0)(np.arange(5.0)).block_until_ready()


def test_programs_built_after_warm_up_are_logged(caplog):
    compile_counter.install()
    try:
        compile_counter.mark_warm(done=False)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            before = compile_counter.num_compilations()
            _new_program()  # during warm-up: counted, not logged
            assert compile_counter.num_compilations() == before + 1
            assert not [r for r in caplog.records if compile_counter.AFTER_WARM_UP in r.message]

            compile_counter.mark_warm()
            _new_program()
            _new_program()
        logged = [r.message for r in caplog.records if compile_counter.AFTER_WARM_UP in r.message]
        assert len(logged) == 2 and "(2 so far)" in logged[1]
    finally:
        compile_counter.mark_warm(done=False)
