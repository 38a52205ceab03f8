import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: small test tensors gain nothing from two, and oversubscription on a busy 2-core machine
# made some tests 100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts seeded and on one thread (a Trainer run may change the thread count)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _pce_logger_into_caplog(request):
    """A test that asks for ``caplog`` sees the ``pce`` logger's records whatever ran before it: the logger stops
    propagating once a Trainer has set it up (``setup_logger``), so caplog's handler is attached to it directly
    (and propagation is off meanwhile, so a record is captured once)."""
    if "caplog" not in request.fixturenames:
        yield
        return
    import logging

    caplog = request.getfixturevalue("caplog")
    log = logging.getLogger("pce")
    was = log.propagate
    log.propagate = False
    log.addHandler(caplog.handler)
    try:
        yield
    finally:
        log.removeHandler(caplog.handler)
        log.propagate = was
