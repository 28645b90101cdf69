"""The last call of a script run under `accelerate launch`."""

from accelerate import PartialState


def end_process_group():
    """Tear the process group down before the interpreter exits, every process at once.

    Left to interpreter shutdown, or torn down while another process still works, a communication thread can abort
    the process ('terminate called without an active exception': seen under ZeRO-3, and under ZeRO-2 on a process that
    finished first). Without a process group (one process, no launcher) it does nothing.
    """
    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()
