"""The `mixroute` command line (typer).

Every command is registered below, in one list: this file is the map of the CLI. Each command is a plain
function in the module of its group (model, config, train, evaluate, data, prune, report, adapters); shared
output and the one way user errors are reported live in ``common.py``. Command modules import heavy code
(torch, transformers) inside the functions, so `mixroute --help` stays fast.
"""

from __future__ import annotations

import typer

import mixroute
from mixroute.cli import adapters, config, data, evaluate, federate, library, model, prune, report, serve, train
from mixroute.cli.common import console

app = typer.Typer(
    name="mixroute",
    help="Routed mixtures of parameter-efficient experts (MoP, MoA, MoE-LoRA, SMoRA, Poly/MHR) on one frozen LLM.\n\n"
    "Typical flow: `mixroute train configs/moa_dolly.yaml` -> `mixroute eval runs/moa_dolly` -> "
    "`mixroute report runs/moa_dolly`.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        console.print(mixroute.__version__)
        raise typer.Exit()


@app.callback()
def _main(
    # eager: without a command, click stops at "Missing command" before a plain option is looked at
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    pass


def _group(name: str, help_text: str) -> typer.Typer:
    sub = typer.Typer(help=help_text, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub


# The whole CLI: the top-level commands, then the command groups and their commands.
app.command("train", epilog=train.EXAMPLES)(train.train_cmd)
app.command("eval", epilog=evaluate.EVAL_EXAMPLES)(evaluate.eval_cmd)
app.command("compare", epilog=evaluate.COMPARE_EXAMPLES)(evaluate.compare_cmd)
app.command("generate", epilog=evaluate.GENERATE_EXAMPLES)(evaluate.generate_cmd)
app.command("report", help=report.HELP, epilog=report.EXAMPLES)(report.report_cmd)
app.command("prune", help=prune.HELP, cls=prune.PruneHelp)(prune.prune_cmd)
app.command("federate", epilog=federate.EXAMPLES)(federate.federate_cmd)
app.command("serve", epilog=serve.EXAMPLES)(serve.serve_cmd)

model_app = _group("model", model.HELP)
model_app.command("info")(model.info_cmd)

config_app = _group("config", config.HELP)
config_app.command("show")(config.show_cmd)

data_app = _group("data", data.HELP)
data_app.command("inspect")(data.inspect_cmd)
data_app.command("synthetic")(data.synthetic_cmd)
data_app.command("partition")(data.partition_cmd)

adapters_app = _group("adapters", adapters.HELP)
adapters_app.command("import")(adapters.import_cmd)
adapters_app.command("export")(adapters.export_cmd)

library_app = _group("library", library.HELP)
library_app.command("create", epilog=library.CREATE_EXAMPLES)(library.create_cmd)
library_app.command("add", epilog=library.ADD_EXAMPLES)(library.add_cmd)
library_app.command("remove")(library.remove_cmd)
library_app.command("list")(library.list_cmd)
library_app.command("route", epilog=library.ROUTE_EXAMPLES)(library.route_cmd)
library_app.command("export")(library.export_cmd)
library_app.command("fit-router", epilog=library.FIT_EXAMPLES)(library.fit_router_cmd)
library_app.command("calibrate", epilog=library.FIT_EXAMPLES)(library.calibrate_cmd)
library_app.command("curve", epilog=library.FIT_EXAMPLES)(library.curve_cmd)
