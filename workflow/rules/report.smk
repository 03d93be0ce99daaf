# Accuracy and time-to-accuracy of all runs, beside the published records.


rule report:
    input:
        summaries=expand(f"{RESULTS}/runs/{{run}}/summary.json", run=config["runs"]),
        metrics=expand(f"{RESULTS}/runs/{{run}}/metrics.csv", run=config["runs"]),
        steps=expand(f"{RESULTS}/runs/{{run}}/steps.csv", run=config["runs"]),
        evals=expand(f"{RESULTS}/runs/{{run}}/eval.json", run=config["runs"]),
    output:
        markdown=f"{RESULTS}/report/summary.md",
        table=report(
            f"{RESULTS}/report/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
        ),
        references=report(
            f"{RESULTS}/report/references.csv",
            caption="../report/references.rst",
            category="Summary",
        ),
        projection=report(
            f"{RESULTS}/report/projection.csv",
            caption="../report/projection.rst",
            category="Projection",
        ),
        figures=[
            report(
                f"{RESULTS}/report/{name}.png",
                caption=f"../report/{name}.rst",
                category=category,
            )
            for name, category in pipeline.REPORT_FIGURES.items()
        ],
        html=f"{RESULTS}/report/report.html",
    log:
        f"{LOGS}/report/report.log",
    benchmark:
        f"{BENCHMARKS}/report/report.tsv"
    params:
        runs=expand(f"{RESULTS}/runs/{{run}}", run=config["runs"]),
        settings=json.dumps(config["report"]),
        out_dir=lambda wildcards, output: os.path.dirname(output.markdown),
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=1000,
    localrule: True
    shell:
        "flashnet report --runs {params.runs:q} --settings {params.settings:q} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"
