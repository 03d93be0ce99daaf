"""ResNet-50 training throughput on one GPU, measured end to end, from synthetic tensors to shards.

    flashnet bench gpu [--configs 1,2,3,4,5] [--batch-size 256] [--steps 50] [--warmup 10]
                       [--shards DIR/manifest.json [--make-shards N]] [--workers W] [--out results.json]
    flashnet bench gpu --smoke        (tiny, on CPU: exercises every code path, measures nothing)

Configurations (``--configs``, any subset, or ``all``; they always run in the order below):

    5   plain reference: torchvision resnet50, NCHW, torch.autocast bf16, torch.optim.SGD, a minimal
        hand-written loop on synthetic data (what torchvision's references/classification does)
    5c  the same with channels_last, to separate the memory format from everything else
    1   the project's step (ImageNetClassifier.training_step + LARS + warmup-poly schedule) on
        synthetic uint8 batches already on the GPU, precision 32-true (TF32 convolutions), eager
    2e  the same in bf16-mixed, eager
    2   the same in bf16-mixed with torch.compile (mode default: what ``compile: true`` does)
    2r  ... torch.compile(mode="reduce-overhead"): CUDA graphs
    2m  ... torch.compile(mode="max-autotune-no-cudagraphs"): long compile, Triton autotuning
    3d  data only: the real train_loader from WebDataset shards, CPU decoding in W workers, batches
        copied to the GPU; no model
    3   the full pipeline: that loader feeding the bf16 compiled step
    4d  data only: the loader handing undecoded JPEGs to nvJPEG (``decode_jpegs_on_device``), GPU crop/flip
    4   the full pipeline with GPU decoding

Every project configuration is measured twice: through ``Trainer.fit`` (``loop: fit``, the path the
pipeline trains with) and in a hand-written loop calling the same module's ``training_step``,
backward, ``optimizer.step()`` and the scheduler (``loop: manual``); the difference is Lightning's
overhead. Configurations 3 and 4 use the compile mode that was fastest among 2/2r/2m in this run
(``--pipeline-compile-mode auto``), or ``default`` when none of those ran.

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
  date. ``--smoke`` runs ResNet-18 at 32 px, batch 8, 2 steps on the CPU: its numbers prove that the
  code runs and the arithmetic is wired, nothing about speed.

The files, one idea each: ``configs.py`` (the configurations and the problem size), ``inputs.py``
(the shards the data configurations read), ``project.py`` (the project's module and its batches),
``loops.py`` (the timed hand-written loop and Trainer.fit), ``runners.py`` (one configuration
measured into rows), ``report.py`` (goals, Lightning's overhead, the table), ``cli.py`` (options,
device, the run); ``python -m flashnet.bench.gpu`` is ``flashnet bench gpu``.
"""
