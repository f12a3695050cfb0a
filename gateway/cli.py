"""The ``bastion`` command line."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from bastion.gateway import cli_serve
from bastion.gateway.cli_drift import drift
from bastion.gateway.cli_incidents import (
    Token,
    Url,
    count,
    incidents,
    log_offline,
    quarantine_export,
)
from bastion.gateway.cli_incidents import admin_call as _admin

app = typer.Typer(
    help="Bastion: a Triton-compatible inference gateway.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


quarantine = typer.Typer(help="List, inspect, release and purge quarantined inputs.")
app.add_typer(quarantine, name="quarantine")
quarantine.command("export")(quarantine_export)
keys = typer.Typer(help="Create, list and revoke client API keys (stored hashed).")
app.add_typer(keys, name="keys")
clients = typer.Typer(help="Clients the stateful defence tracks: rungs, evidence, release.")
app.add_typer(clients, name="clients")
app.add_typer(incidents, name="incidents")
app.add_typer(drift, name="drift")

ModelName = Annotated[str, typer.Argument(help="Model name in the repository.", metavar="MODEL")]
Item = Annotated[str, typer.Argument(help="Quarantine record id.", metavar="ITEM")]
Client = Annotated[str, typer.Argument(help="Client id (or key client name).", metavar="CLIENT")]
Limit = Annotated[int, typer.Option(help="Most rows to show.")]
RepositoryOption = Annotated[
    Path | None, typer.Option(help="Triton-style model repository (default: the bundled one).")
]
VersionOption = Annotated[int | None, typer.Option(help="Version folder (default: the latest).")]
CleanData = Annotated[
    Path | None, typer.Option(help="Clean images (.npz with 'images') (default: bundled split).")
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


@app.callback()
def main() -> None:
    """Bastion: a Triton-compatible inference gateway."""


@quarantine.command("list")
def quarantine_list(
    url: Url = "127.0.0.1:8000",
    token: Token = "",
    model: Annotated[str | None, typer.Option(help="Only records of this model.")] = None,
    status: Annotated[
        str | None, typer.Option(help="quarantined | released | review (served suspicious copies)")
    ] = None,
    limit: Limit = 50,
) -> None:
    """Records of the store (withheld inputs and review copies), newest first."""
    page = _admin(
        url,
        token,
        "GET",
        "/v2/quarantine",
        query={"model": model, "status": status, "limit": limit},
    )
    typer.echo(count(page["total"], "record"))
    for r in page["items"]:
        scores = " ".join(f"{k}={v:.3g}" for k, v in r["scores"].items() if v is not None)
        typer.echo(
            f"{r['id']}  {r['status']:<11} {r['model']}/{r['version']}  "
            f"client={r['client_id']} request={r['request_id']}[{r['image_index']}]  {scores}"
        )


@quarantine.command("show")
def quarantine_show(item: Item, url: Url = "127.0.0.1:8000", token: Token = "") -> None:
    """One record as JSON, with its input tensor."""
    import json

    typer.echo(json.dumps(_admin(url, token, "GET", f"/v2/quarantine/{item}"), indent=1))


@quarantine.command("release")
def quarantine_release(
    item: Item,
    url: Url = "127.0.0.1:8000",
    token: Token = "",
    note: Annotated[str | None, typer.Option(help="Why it was a false positive.")] = None,
) -> None:
    """Mark a record a false positive (kept, with its input, for recalibration)."""
    record = _admin(url, token, "POST", f"/v2/quarantine/{item}/release", body={"note": note})
    typer.echo(f"{record['id']} {record['status']}")


@quarantine.command("purge")
def quarantine_purge(
    url: Url = "127.0.0.1:8000",
    token: Token = "",
    status: Annotated[
        str | None,
        typer.Option(help="Only records of this status: quarantined | released | review."),
    ] = None,
    older_than_s: Annotated[
        float | None, typer.Option(help="Only records older than this many seconds.")
    ] = None,
    item: Annotated[
        list[str] | None, typer.Option(help="Only this record id (repeatable).")
    ] = None,
) -> None:
    """Delete records by status, age and/or id."""
    body = {"status": status, "older_than_s": older_than_s, "ids": item}
    typer.echo(f"purged {_admin(url, token, 'POST', '/v2/quarantine/purge', body=body)['purged']}")


@quarantine.command("stats")
def quarantine_stats(
    url: Url = "127.0.0.1:8000",
    token: Token = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Records by status, model and client; stored bytes; age range; quotas and drops."""
    import json

    from bastion.gateway.admin_client import describe_stats

    stats = _admin(url, token, "GET", "/v2/quarantine/stats")
    typer.echo(json.dumps(stats, indent=1) if as_json else "\n".join(describe_stats(stats)))


@keys.command("create")
def keys_create(
    client: Annotated[str, typer.Option(help="The client the key identifies.")],
    note: Annotated[str | None, typer.Option(help="Who or what holds it.")] = None,
    url: Url = "127.0.0.1:8000",
    token: Token = "",
) -> None:
    """A new key; it is printed once and never stored (only its SHA-256 is)."""
    made = _admin(url, token, "POST", "/v2/admin/keys", body={"client": client, "note": note})
    typer.echo(f"id      {made['id']}\nclient  {made['client']}\nkey     {made['key']}")
    typer.echo("(shown once: the gateway keeps only its hash)", err=True)


@keys.command("list")
def keys_list(url: Url = "127.0.0.1:8000", token: Token = "") -> None:
    """Every key's id, client, note, creation time and state (never the key)."""
    import time

    listed = _admin(url, token, "GET", "/v2/admin/keys")["keys"]
    typer.echo(f"{'id':<12}  {'client':<24} {'state':<8} {'created':<20} note")
    if not listed:
        typer.echo("(no keys: inference needs none until one is made)")
    for k in listed:
        made = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k["created_at"]))
        state = "active" if k["active"] else "revoked"
        typer.echo(f"{k['id']}  {k['client']:<24} {state:<8} {made}Z  {k['note'] or ''}")


@keys.command("revoke")
def keys_revoke(
    key_id: Annotated[
        str, typer.Argument(help="The key's public id (keys list).", metavar="KEY_ID")
    ],
    url: Url = "127.0.0.1:8000",
    token: Token = "",
) -> None:
    """Revokes a key: refused at once by this gateway, by others within keys_refresh_s."""
    record = _admin(url, token, "POST", f"/v2/admin/keys/{key_id}/revoke")
    typer.echo(f"revoked {record['id']} ({record['client']})")


@clients.command("list")
def clients_list(
    url: Url = "127.0.0.1:8000",
    token: Token = "",
    rung: Annotated[str | None, typer.Option(help="observe | throttle | strict | refuse")] = None,
    limit: Limit = 50,
) -> None:
    """Tracked clients, most recently seen first, with their rung and evidence (evidence: the
    client's own CUSUM statistic; campaign: its campaign's pooled one, over its members, and
    the rung it reached; a member takes it once bound: see bastion clients show)."""
    query = {"rung": rung, "limit": limit}
    rows = _admin(url, token, "GET", "/v2/admin/clients", query=query)["clients"]
    typer.echo(
        f"{'client':<32} {'rung':<8} {'evidence':>8} {'campaign':>8} {'its rung':<8} "
        f"{'members':>7} {'images':>7} {'flagged':>7} {'probes':>6}"
    )
    for c in rows:
        typer.echo(
            f"{c['client']:<32} {c['rung']:<8} {c['statistic']:8.1f} "
            f"{c['campaign_statistic']:8.1f} {c['campaign_rung']:<8} {c['campaign_size']:>7} "
            f"{c['images']:>7} {c['flagged']:>7} {c['probes']:>6}"
        )


@clients.command("show")
def clients_show(client: Client, url: Url = "127.0.0.1:8000", token: Token = "") -> None:
    """One client's evidence and its campaign."""
    import json

    typer.echo(json.dumps(_admin(url, token, "GET", f"/v2/admin/clients/{client}"), indent=1))


@clients.command("release")
def clients_release(client: Client, url: Url = "127.0.0.1:8000", token: Token = "") -> None:
    """Lifts containment from a client and every client of its campaign."""
    released = _admin(url, token, "POST", f"/v2/admin/clients/{client}/release")["released"]
    typer.echo(f"released {count(len(released), 'client')}: {', '.join(released)}")


app.command("serve")(cli_serve.serve)


@app.command()
def calibrate(
    model: ModelName,
    model_repository: RepositoryOption = None,
    version: VersionOption = None,
    report_fpr: Annotated[
        list[float] | None,
        typer.Option(help="Also measure this clean FPR (repeatable); tiers come from config."),
    ] = None,
    data: CleanData = None,
    train_data: Annotated[
        Path | None, typer.Option(help="Labelled training .npz (images, labels).")
    ] = None,
    test_data: Annotated[
        Path | None, typer.Option(help="Held-out clean .npz the tiers are measured on.")
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Fit the screening on clean data (class Gaussian on train, tails on calibration), report
    the tiers of config.pbtxt (and other rates) on the held-out test split, write the files."""
    from bastion.gateway.repository import ModelRepository
    from bastion.gateway.screening.calibrate import calibrate_model
    from bastion.gateway.screening.policy import from_config
    from bastion.gateway.screening.tail import UnsupportedTarget
    from bastion.gateway.settings import DEFAULT_REPOSITORY

    repository = model_repository or DEFAULT_REPOSITORY
    try:
        calibration, paths = calibrate_model(
            repository,
            model,
            version,
            data,
            device,
            train_data,
            test_data,
            tuple(report_fpr or ()),
        )
    except UnsupportedTarget as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    policy = from_config(ModelRepository(repository).config(model))
    tiers = {policy.block_fpr: "block", policy.review_fpr: "review"} if policy else {}
    for path in paths:
        typer.echo(f"wrote {path}")
    typer.echo(
        f"{calibration.samples} calibration images, combiner {calibration.rule}; smallest "
        f"supported FPR {calibration.smallest_fpr:.2g}. A tier flags a combined score above "
        "-log10(its FPR); move one in config.pbtxt (no recalibration needed)."
    )
    typer.echo(
        f"{'tier':<8} {'FPR':>7} {'threshold':>9} {'calib FPR':>9} "
        f"{'test FPR':>9} {'flagged/n':>10} {'95% upper':>9}"
    )
    for key, realised in calibration.calibration_fpr.items():
        target = float(key)
        test = calibration.test.get(key)
        cut = -math.log10(target)
        line = f"{tiers.get(target, ''):<8} {target:>7.2%} {cut:>9.3f} {realised:>9.2%}"
        if test:
            line += (
                f" {test['fpr']:>9.2%} {test['flagged']:>4}/{test['samples']:<5} "
                f"{test['upper95']:>9.2%}"
            )
        typer.echo(line)
    typer.echo("(the test FPR is the one to trust: the calibration split fitted the tails)")
    record = {"model": model, "samples": calibration.samples, "combiner": calibration.rule}
    log_offline("recalibration", model, {**record, "files": [str(p) for p in paths]})


@app.command()
def profile(
    model: ModelName,
    model_repository: RepositoryOption = None,
    version: VersionOption = None,
    data: CleanData = None,
    device: DeviceOption = "auto",
) -> None:
    """Write the drift reference profile of a torch model (screened or not) beside its weights.
    (calibrate writes it too, for screened models.)"""
    from bastion.gateway.monitoring.profile import profile_model
    from bastion.gateway.settings import DEFAULT_REPOSITORY

    path = profile_model(model_repository or DEFAULT_REPOSITORY, model, version, data, device)
    typer.echo(f"wrote {path}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def evaluate(
    ctx: typer.Context,
    everything: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Then replay the examples through a live gateway and "
            "run the black-box attacks over HTTP (about 15 minutes in all).",
        ),
    ] = False,
) -> None:
    """White-box (ART) and adaptive evaluation of the screening on the test split.

    Other arguments go to 'python -m bastion.benchmarks.adversarial.evaluate' (--seeds,
    --attacks, --no-adaptive, --out, --save-examples; see 'bastion evaluate -- --help').
    Results: benchmarks/results/adversarial/.
    """
    from bastion.benchmarks.adversarial import evaluate as white_box

    args = list(ctx.args)
    if everything and "--save-examples" not in args:
        args.append("--save-examples")
    status = white_box.main(args)
    if everything:
        from bastion.benchmarks.adversarial import blackbox, through_gateway

        status = max(status, through_gateway.main([]), blackbox.main([]))
    raise typer.Exit(status)


@app.command("attack-sim")
def attack_sim(
    url: Url = "127.0.0.1:8000",
    model: Annotated[str, typer.Option(help="Model to send the traffic to.")] = "digits",
    rate: Annotated[float, typer.Option(help="Requests per second (open loop).")] = 50.0,
    duration: Annotated[float, typer.Option(help="Seconds to run.")] = 30.0,
    adversarial_fraction: Annotated[
        float, typer.Option(help="Share of adversarial requests.")
    ] = 0.1,
    clients: Annotated[int, typer.Option(help="Honest client ids (X-Client-ID).")] = 4,
    examples: Annotated[
        Path | None,
        typer.Option(help=".npz with 'images' (n,1,28,28), pixels 0..1 (default: made by PGD)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the traffic and attacks.")] = 0,
    max_requests: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
) -> None:
    """Replay a mix of clean and adversarial traffic into a running gateway."""
    from bastion.gateway.attack_sim import format_report, simulate

    report = simulate(
        url,
        model=model,
        rate_per_s=rate,
        duration_s=duration,
        adversarial_fraction=adversarial_fraction,
        clients=clients,
        examples=examples,
        seed=seed,
        max_requests=max_requests,
    )
    typer.echo(format_report(report))
