"""Where the engine reports what it does while a profiler listens (gpudiff.profiler).

``listener`` is None except inside ``gpudiff.profiler.profile()``: then every op, kernel call,
CUDA launch and backward node tells it what ran and when, so the profiler can split an op's
time into dispatch (Python around the op) and kernel (the op's forward: a compiled kernel or
the xp reference). The checks are one global read each, so the engine pays nothing else while
no one listens. A listener implements:

  op_begin(name, inputs)                             an op's apply starts (a GPU event here)
  op(name, device, t0, t_fwd0, t_fwd1, t1, shapes)   an op's apply (times: perf_counter_ns)
  kernel(name, device, t0, t1, declined)             a fast kernel of the table ran
                                                     (declined: it returned None)
  launch(source_file, kernel_name)                   a CUDA kernel launched (GPU or emulator)
  backward(name, t0, t1)                             a node's backward ran
"""
listener = None
