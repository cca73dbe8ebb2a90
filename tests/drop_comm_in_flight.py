"""Run by tests/test_failure_propagation.py in a subprocess: rank 0 drops its communicator while
its all-reduce is in flight; rank 1 completes the operation later, on gloo's worker thread. If a
completion callback held the last reference to the communicator, the process group would be
destroyed on that thread (std::terminate: the whole process aborts). Prints "survived"."""

import threading, time, torch, gc
from datetime import timedelta
import torch.distributed as dist
from resilient_train.sync.communicator import ProcessGroupCommunicator
from resilient_train.sync.threads import make_gloo_group
T = timedelta(seconds=20)
master = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=T, wait_for_workers=False)
def body(r):
    store = dist.TCPStore("127.0.0.1", master.port, 2, is_master=False, timeout=T)
    comm = ProcessGroupCommunicator(make_gloo_group(store, r, 2, T))
    comm.allreduce_sum(torch.ones(4)).wait(T)
    if r == 0:
        comm.allreduce_sum(torch.ones(4))   # in flight; this rank drops its communicator now
        del comm, store
        gc.collect()
        return
    time.sleep(1.0)
    comm.allreduce_sum(torch.ones(4)).wait(T)  # completes rank 0's op on gloo's thread
    time.sleep(1.0)
ts = [threading.Thread(target=body, args=(r,)) for r in range(2)]
[t.start() for t in ts]; [t.join(30) for t in ts]
time.sleep(1.0)
print("survived")
