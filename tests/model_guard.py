"""What a test of "refused before any model work" needs: the message a guarded model raises if it runs at all."""

MODEL_WORK = "model work started"


def model_work(*args, **kwargs):
    raise AssertionError(MODEL_WORK)
