"""The job layer: the only code that knows submitit and SLURM.

``slurm``   the SLURM client queries (scontrol, sacct, sinfo, scancel) and the job states they return;
``lock``    one job per run: the ``active.json`` record and whether a recorded job still runs;
``follow``  waiting on a submitted job: its log, the scheduler's view, node failures, Ctrl-C/SIGTERM;
``submit``  the executor, the private job folder, and :func:`submit.run_job`, which every kind of
            job (training, evaluation) goes through: submit, follow, fail with one message format;
``task``    what the job's own processes ask of the layer: Lightning's cluster environment and the
            preemption signal.
"""
