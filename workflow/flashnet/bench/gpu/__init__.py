"""ResNet-50 training throughput on one GPU, measured end to end, from synthetic tensors to shards.

    flashnet bench gpu [--configs default] [--batch-sizes 32,64,128,256] [--steps 50] [--warmup 10]
                       [--shards DIR/manifest.json [--make-shards N]] [--workers W] [--cold-read auto]
                       [--time-budget SECONDS] [--out DIR]
    flashnet bench gpu --smoke        (tiny, on CPU: every row the GPU run would measure, measuring nothing)

Every configuration is measured at each per-device batch size of ``--batch-sizes`` (batch sizes
outermost). ``--out`` (default ``$OUT``) gets gpu.json and gpu.md, rewritten after every
configuration, so a run cut short keeps what it measured; ``--time-budget`` starts no configuration
after that many seconds.

Configurations (``--configs``: ids, ``default`` = all but 2r and 2m, or ``all``; they always run in
the order below):

    5   plain reference: torchvision resnet50, NCHW, torch.autocast bf16, torch.optim.SGD, a minimal
        hand-written loop on synthetic data (what torchvision's references/classification does)
    5c  the same with channels_last, to separate the memory format from everything else
    1   the project's step (ImageNetClassifier.training_step + LARS + warmup-poly schedule) on
        synthetic uint8 batches already on the GPU, precision 32-true (TF32 convolutions), eager
    2e  the same in bf16-mixed, eager
    2   the same in bf16-mixed with torch.compile (mode default: what ``compile: true`` does)
    2h  the same in 16-mixed (fp16 autocast and GradScaler)
    2r  ... torch.compile(mode="reduce-overhead"): CUDA graphs (no run setting selects it)
    2m  ... torch.compile(mode="max-autotune-no-cudagraphs"): long compile (likewise)
    3d  data only: the real train_loader from WebDataset shards, CPU decoding in W workers, batches
        copied to the GPU; no model
    3   the full pipeline: that loader feeding the bf16 compiled step
    4d  data only: the loader handing undecoded JPEGs to nvJPEG (``decode_jpegs_on_device``: one decode
        call, batched crops on a side stream)
    4   the full pipeline with GPU decoding

Every project configuration is measured twice: through ``Trainer.fit`` (``loop: fit``, the path the
pipeline trains with: DDP in one process per GPU over NCCL, gloo on the CPU, with the run's gradient
hook and its per-step callbacks) and in a hand-written loop calling the same module's
``training_step``, backward, ``optimizer.step()`` and the scheduler (``loop: manual``); the
difference is Lightning's, DDP's and the callbacks' overhead. Configurations 3 and 4 compile as
``compile: true`` does (``--pipeline-compile-mode default``). Data configurations evict the shards
from the page cache first (``--cold-read``: drop_caches as root, else posix_fadvise per shard).

How the figures are taken:

* Warm-up steps run first and are not timed: they hold torch.compile, CUDA-graph capture, cuDNN's
  autotuning (``cudnn.benchmark``, as recipe.py sets it) and the data loader's start. The device is
  synchronised (``torch.cuda.synchronize``) before reading the host clock at both ends of the timed
  steps, so queued work is inside the figure.
* The optimizer's share is the GPU time between CUDA events recorded around each
  ``optimizer.step()`` of the manual loop, summed, over the loop's wall time.
* Data configurations time at least 10 batches per loader worker after at least 2 per worker of
  warm-up: the loader prefetches up to ``4 × W`` batches, and a short timed window would be served
  from that backlog and report the model's speed instead of the loader's.
* A bf16 8192³ matrix product (random normal operands, median of 20 CUDA-event-timed products
  after 3 warm-ups) is measured at the start and at the end of the run: the arithmetic ceiling, and
  a check that the clocks did not sag during the run.
* TFLOP/s counts 24.5 GFLOP per 224-px image: 3 × 2 × 4.089 GMAC, where 4.089 G multiply-adds is
  ResNet-50's forward pass (torchvision's ``ResNet50_Weights`` metadata, "GFLOPS", counted by fvcore,
  which counts one multiply-add as one operation), ×2 FLOP per multiply-add, ×3 for forward +
  backward (gradients with respect to inputs and to weights each cost about one forward). PyTorch's
  FlopCounterMode counts 24.3 GFLOP for the same step (convolutions and matmuls only; the image
  needs no gradient); BatchNorm, ReLU and the optimizer are memory-bound work not counted as FLOP.
* Every figure comes with the GPU, driver, CUDA, cuDNN, torch and host CPU it was taken on, and the
  date. ``--smoke`` runs ResNet-18 at 32 px, each batch size a sixteenth, 2 steps on the CPU: its
  numbers prove that the code runs and the arithmetic is wired, nothing about speed.

The files, one idea each: ``configs.py`` (the configurations and the problem size), ``inputs.py``
(the shards the data configurations read), ``project.py`` (the project's module and its batches),
``loops.py`` (the timed hand-written loop and Trainer.fit), ``runners.py`` (one configuration
measured into rows), ``report.py`` (goals, Lightning's overhead, the table), ``cli.py`` (options,
device, the run); ``python -m flashnet.bench.gpu`` is ``flashnet bench gpu``.
"""
