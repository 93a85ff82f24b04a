"""`python tests/kill_mid_step.py STEP MICRO train ...`: the chatlora command, SIGKILLed right before
micro-batch MICRO of optimizer step STEP (0-based) of the plain training path, as a crash or an
out-of-memory kill would end it. The fault lives here, not in chatlora's training loop."""

import os
import signal
import sys

from chatlora.cli import main
from chatlora.train.gradients import PlainGradients

STEP, MICRO = int(sys.argv[1]), int(sys.argv[2])
backward = PlainGradients.backward


def backward_that_dies(self, step, examples, mine, supervised):
    if step == STEP:
        collate, count = self.collate, iter(range(1 << 30))

        def dying(chunk):
            if next(count) == MICRO:
                os.kill(os.getpid(), signal.SIGKILL)
            return collate(chunk)

        self.collate = dying
    return backward(self, step, examples, mine, supervised)


PlainGradients.backward = backward_that_dies
sys.exit(main(sys.argv[3:]))
