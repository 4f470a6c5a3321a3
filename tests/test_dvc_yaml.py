"""dvc.yaml is what `caption-pipeline dvc-yaml` generates from the Kedro pipelines, catalog and
conf/ environments (issue 13: it had drifted from them), and what it generates holds what DVC
needs: the datasets a stage reads that another writes, every environment's overrides of the
parameters it reads, its outputs. No pipeline runs: loading the project takes seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from caption_pipeline.__main__ import cli
from caption_pipeline.mlops import dvc_drift, dvc_render, dvc_stages
from caption_pipeline.pipeline_registry import ON_DEMAND
from caption_pipeline.project import PROJECT_ROOT


@pytest.fixture(scope="module")
def project() -> dvc_stages.Project:
    return dvc_stages.load_project(PROJECT_ROOT)


@pytest.fixture(scope="module")
def generated(project) -> str:
    return dvc_render.generate(project)


@pytest.fixture(scope="module")
def stages(generated) -> dict:
    return yaml.safe_load(generated)["stages"]


def stage_pipelines(project) -> dict:
    return {
        name: p for name, p in project.pipelines.items() if name not in ON_DEMAND | {"__default__"}
    }


def test_dvc_yaml_is_what_the_project_generates(generated):
    problems = dvc_drift.drift((PROJECT_ROOT / "dvc.yaml").read_text(), generated)
    assert not problems, "dvc.yaml is out of date: run `caption-pipeline dvc-yaml`\n" + "\n".join(
        problems
    )


def test_drift_names_the_stage_and_the_missing_entry(project, generated):
    """The issue's drifts, put back into a generated dvc.yaml, are named."""
    doc = yaml.safe_load(generated)
    ingest = doc["stages"]["ingest"]
    ingest["params"] = [p for p in ingest["params"] if "conf/coco/parameters.yml" not in p]
    doc["stages"]["train"]["deps"].remove(project.path("shards"))
    doc["stages"]["train"]["deps"].append("data/extra")
    problems = dvc_drift.drift(yaml.safe_dump(doc, sort_keys=False), generated)
    assert problems == [
        "stage ingest: params missing conf/coco/parameters.yml:dataset",
        f"stage train: deps missing {project.path('shards')}",
        "stage train: deps extra data/extra",
    ]
    assert dvc_drift.drift(generated, generated) == []
    assert (
        dvc_drift.drift(generated.replace("# One DVC stage", "# A DVC stage"), generated)[0]
        == "the same stages; comments or layout differ:"
    )


def test_a_stage_per_pipeline_in_data_flow_order(project, stages):
    assert list(stages) == [
        "synthetic",
        "ingest",
        "vocab",
        "shard",
        "features",
        "train",
        "evaluate",
        "export",
    ]
    assert set(stages) == set(stage_pipelines(project))
    for name, stage in stages.items():
        assert stage["cmd"] == f"kedro run --pipelines={name}"


def test_inputs_another_stage_writes_are_deps(project, stages):
    pipelines = stage_pipelines(project)
    for name, pipeline in pipelines.items():
        written_elsewhere = set().union(
            *(p.all_outputs() for other, p in pipelines.items() if other != name)
        )
        for dataset in pipeline.inputs() & written_elsewhere:
            path = project.path(dataset)
            assert path, f"{name} reads {dataset}, which has no path: it cannot run alone"
            assert path in stages[name]["deps"], f"stage {name}: deps miss {dataset} ({path})"
    # model_inputs may be a pointer to the image shards; raw_dataset names the dataset folder
    assert project.path("shards") in stages["train"]["deps"]
    for name in ("ingest", "features", "evaluate"):
        assert project.param("dataset.root") in stages[name]["deps"], name


def test_every_environment_override_of_a_read_parameter_is_a_param(project, stages):
    """Independently of how dvc_stages finds them: where Kedro resolves a parameter a stage
    reads to another value in an environment than in conf/base (globals included), the
    stage lists a file of that environment for it."""
    from kedro.framework.project import settings

    conf = PROJECT_ROOT / settings.CONF_SOURCE
    envs = [p.name for p in conf.iterdir() if p.is_dir() and p.name not in {"base", "local"}]
    assert {"smoke", "coco"} <= set(envs)
    overridden = 0
    for env in envs:
        loader = settings.CONFIG_LOADER_CLASS(
            conf_source=str(conf), env=env, **settings.CONFIG_LOADER_ARGS
        )
        params = loader["parameters"]
        for name, pipeline in stage_pipelines(project).items():
            listed = [
                (file, key)
                for entry in stages[name].get("params", [])
                for file, keys in entry.items()
                for key in keys
                if file.startswith(f"conf/{env}/")
            ]
            for key in (
                i.removeprefix("params:") for i in pipeline.inputs() if i.startswith("params:")
            ):
                value = params
                for part in key.split("."):
                    value = value[part]
                if value == project.param(key):
                    continue
                overridden += 1
                assert any(
                    k == key
                    or k.startswith(key + ".")
                    or key.startswith(k + ".")
                    or file.endswith("globals.yml")
                    for file, k in listed
                ), f"stage {name}: conf/{env} overrides params:{key}, no conf/{env} file listed"
    assert overridden >= 10  # smoke and coco override model, train, shard, ... (and globals)


def test_evaluate_and_ingest_track_the_overrides_that_features_does(stages):
    """The issue's two omissions. Evaluate reads no `params:model` any more: the architecture
    is the saved captioner's, a dependency, so a model override reaches it through train."""

    def params(stage):
        return {(f, k) for e in stages[stage]["params"] for f, keys in e.items() for k in keys}

    assert ("conf/coco/parameters.yml", "dataset") in params("ingest")
    for env in ("smoke", "coco"):
        assert (f"conf/{env}/parameters_train.yml", "model") in params("features")
        assert (f"conf/{env}/parameters_train.yml", "model") in params("train")
    assert not any(key == "model" for _, key in params("evaluate"))
    assert "data/06_models/captioner.keras" in stages["train"]["outs"]
    assert "data/06_models/captioner.keras" in stages["evaluate"]["deps"]


def test_outputs_are_outs_metrics_and_plots(project, stages):
    for name, pipeline in stage_pipelines(project).items():
        declared = stages[name].get("outs", []) + [
            next(iter(m)) for m in stages[name].get("metrics", [])
        ]
        for dataset in pipeline.all_outputs():
            if path := project.path(dataset):
                covered = path in declared or any(path.startswith(d + "/") for d in declared)
                assert covered, f"stage {name}: outs miss {dataset} ({path})"
    assert stages["evaluate"]["metrics"] == [{project.path("evaluation_metrics"): {"cache": False}}]
    outs = {out for stage in stages.values() for out in stage.get("outs", [])}
    for plot in yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["plots"]:
        paths = [plot] if isinstance(plot, str) else list(next(iter(plot.values()))["y"])
        assert set(paths) <= outs, plot


def test_an_output_a_parameter_turns_off_is_in_a_folder_out(project, stages):
    """conf/coco writes no captioner.tflite (`export.tflite: false`), and DVC fails a stage
    whose out is missing: the out is the export folder, which holds the SavedModel too (DVC
    refuses an out inside another), and no out of any stage lies inside another."""
    from kedro.framework.project import settings

    tflite, saved_model = project.path("exported_tflite"), project.path("exported_model")
    folder = str(Path(tflite).parent)
    assert saved_model.startswith(folder + "/")
    outs = stages["export"]["outs"]
    assert folder in outs and tflite not in outs and saved_model not in outs
    everything = [o for s in stages.values() for o in s.get("outs", [])]
    for out in everything:
        assert not [o for o in everything if o.startswith(out + "/")], out
    coco = settings.CONFIG_LOADER_CLASS(
        conf_source=str(PROJECT_ROOT / settings.CONF_SOURCE),
        env="coco",
        **settings.CONFIG_LOADER_ARGS,
    )
    assert project.param("export.tflite") is True
    assert coco["parameters"]["export"]["tflite"] is False
    assert {"conf/coco/parameters_export.yml": ["export"]} in stages["export"]["params"]


def test_code_deps_exist(stages):
    for name, stage in stages.items():
        code = [dep for dep in stage["deps"] if dep.startswith("src/")]
        assert code[0] == f"src/caption_pipeline/pipelines/{name}"
        for dep in code:
            assert (PROJECT_ROOT / dep).exists(), f"stage {name}: {dep} does not exist"
            assert not any(
                dep == str(Path("src", *m.split("."))) + ".py" for m in dvc_stages.IGNORED_MODULES
            ), dep


def test_every_note_applies(project, stages):
    """A comment of dvc_stages.NOTES whose dataset a stage no longer reads or writes is stale."""
    for (name, key), note in dvc_stages.NOTES.items():
        path = dvc_stages._note_path(project, key)
        stage = stages[name]
        declared = (
            stage["deps"]
            + stage.get("outs", [])
            + [next(iter(m)) for m in stage.get("metrics", [])]
        )
        assert path in declared, f"NOTES: stage {name} has no {key} ({path}) for {note!r}"


def test_the_check_command(generated):
    result = CliRunner().invoke(cli, ["dvc-yaml", "--check"])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output
    wrong = CliRunner().invoke(cli, ["dvc-yaml", "--check", "--env", "cocoa"])
    assert wrong.exit_code == 1
    assert wrong.output.strip().splitlines()[-1].startswith("Error: no environment 'cocoa' in ")


def test_a_dvc_yaml_for_the_coco_environment():
    """Issue 26: `caption-pipeline dvc-yaml --env coco`. Its stages run `kedro run --env coco`,
    list only conf/base's and conf/coco's files, and read COCO where `dvc add` tracks it: no
    stage writes it (synthetic generates only the shapes dataset), and no stage's outs change."""
    coco_project = dvc_stages.load_project(PROJECT_ROOT, "coco")
    text = dvc_render.generate(coco_project)
    coco = yaml.safe_load(text)["stages"]
    base = yaml.safe_load(dvc_render.generate(dvc_stages.load_project(PROJECT_ROOT)))["stages"]
    assert dvc_render.generated_env(text) == "coco"
    assert dvc_render.generated_env((PROJECT_ROOT / "dvc.yaml").read_text()) == "base"
    assert dvc_render.generated_env("stages: {}\n") is None
    assert "#     dvc add data/01_raw/coco\n" in text
    raw = coco_project.param("dataset.root")
    assert raw == "data/01_raw/coco"
    for name, stage in coco.items():
        assert stage["cmd"] == f"kedro run --env coco --pipelines={name}"
        files = [file for entry in stage.get("params", []) for file in entry]
        assert files and all(f.startswith(("conf/base/", "conf/coco/")) for f in files), name
        outs = [o for o in stage.get("outs", []) if o != base[name].get("outs", [None])[-1]]
        assert raw not in stage.get("outs", []), name
        assert set(outs) <= set(base[name].get("outs", [])), name
    for name in ("ingest", "features", "evaluate"):
        assert raw in coco[name]["deps"] and "data/01_raw/shapes" not in coco[name]["deps"]
    assert "data/01_raw/shapes" in base["synthetic"]["outs"]
    assert raw not in coco["synthetic"]["deps"]
    assert coco["synthetic"]["outs"] == ["data/01_raw/raw_dataset.json"]
    with pytest.raises(ValueError, match="no environment 'cocoa'"):
        dvc_stages.load_project(PROJECT_ROOT, "cocoa")
