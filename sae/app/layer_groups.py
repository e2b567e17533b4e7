"""Layer groups in the train driver: one SAE shared by a group of adjacent layers, trained on the
rows of every member layer harvested in the same forward pass (`sae train --layers 0-29
--layer-groups auto:8`). The grouping itself (similarity, contiguous clustering) is analysis's."""
from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

import analysis
from sae.app.data import Batch, DataSource

ROW_MODES = ("all", "one")
_SITE = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_layers(text: str, what: str = "--layers") -> list[int]:
    """ "0-3,7,9-10" -> [0, 1, 2, 3, 7, 9, 10] (in the order given)."""
    layers: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        match = _RANGE.match(part)
        if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise ValueError(f"{what} {text!r}: {part!r} is not a layer or a rising range like 8-15; e.g. 0-7,8-15")
        first = int(match.group(1))
        layers += list(range(first, int(match.group(2) or first) + 1))
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise ValueError(f"{what} {text!r} names layer(s) {repeated} twice; name each layer once")
    return layers


def parse_spec(spec: str) -> int | list[list[int]]:
    """`auto:G` -> G (groups chosen from the data), or explicit groups "0-7,8-15" -> [[0..7], [8..15]]."""
    if spec.startswith("auto"):
        count = spec[len("auto:"):] if spec.startswith("auto:") else ""
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--layer-groups {spec!r}: write auto:G with a positive number of groups G, e.g. auto:4")
        return int(count)
    groups = [parse_layers(part, "--layer-groups") for part in spec.replace(" ", "").split(",")]
    parse_layers(spec, "--layer-groups")  # no layer in two groups
    return groups


def check_options(layers: str | None, spec: str | None, rows: str, sites: list[str] | None) -> None:
    """Bad layer-group options fail before a model loads."""
    if rows not in ROW_MODES:
        raise ValueError(f"layer_group_rows must be one of {ROW_MODES}, got {rows!r}")
    if layers is not None:
        if sites:
            raise ValueError("give the layers either as --layers or as --sites, not both")
        parse_layers(layers)
    if spec is not None:
        groups = parse_spec(spec)
        if isinstance(groups, int) and layers is None and not sites:
            raise ValueError(f"--layer-groups {spec} needs the layers to group: pass e.g. --layers 0-29")


def member_sites(layers: str | None, spec: str | None, sites: list[str] | None) -> list[str] | None:
    """The sites the stream harvests: --sites, else resid_post of --layers, else of the layers of
    explicit --layer-groups; None leaves the default (the middle layer)."""
    if sites:
        return sites
    if layers is None and spec is not None and not isinstance(groups := parse_spec(spec), int):
        layers = ",".join(str(layer) for group in groups for layer in group)
    return None if layers is None else [f"blocks.{layer}.hook_resid_post" for layer in parse_layers(layers)]


@dataclass
class Grouping:
    """The groups a run trains, and the similarity they were chosen from (saved in run_config.json)."""

    groups: dict[str, list[str]]
    """SAE name -> its member sites, in layer order."""
    spec: str
    """The groups as explicit layer ranges (what a resume reuses)."""
    record: dict
    """sites, similarity matrix, groups, AMAD and the number of tokens the similarity came from."""


def _layers_by_site(sites: list[str]) -> dict[str, int]:
    parsed = {site: _SITE.match(site) for site in sites}
    bad = [site for site, m in parsed.items() if m is None]
    if bad:
        raise ValueError(f"layer groups need hook sites blocks.L.hook_KIND, got {bad}")
    kinds = {m.group(2) for m in parsed.values()}
    if len(kinds) != 1:
        raise ValueError(f"a layer group shares one SAE across layers of one site kind, got {sorted(kinds)}")
    return {site: int(m.group(1)) for site, m in parsed.items()}


def group_name(members: list[str]) -> str:
    """blocks.8-15.hook_resid_post for a group, the site itself for a group of one."""
    if len(members) == 1:
        return members[0]
    first, last = _SITE.match(members[0]), _SITE.match(members[-1])
    return f"blocks.{first.group(1)}-{last.group(1)}.{first.group(2)}"


def choose_groups(first_batch: Batch | dict[str, int], spec: str) -> Grouping:
    """Groups for the sites of `first_batch` (one [N, d] tensor per site, the same tokens): auto:G
    clusters the layers by the angular similarity of these activations; explicit groups are checked.
    Explicit groups need no activations: given only the sites (e.g. the source's widths), the record
    has no similarity."""
    by_layer = _layers_by_site(list(first_batch))
    sites = sorted(by_layer, key=by_layer.get)
    layers = [by_layer[s] for s in sites]
    has_rows = all(isinstance(first_batch[s], torch.Tensor) for s in sites)
    similarity = analysis.angular_similarity({s: first_batch[s] for s in sites}) if has_rows else None
    wanted = parse_spec(spec)
    if isinstance(wanted, int):
        if similarity is None:
            raise ValueError(f"--layer-groups {spec} chooses groups from activations; none were given")
        if wanted > len(sites):
            raise ValueError(f"--layer-groups {spec}: {wanted} groups of {len(sites)} layers; use at most auto:{len(sites)}")
        index_groups = analysis.group_layers(similarity, wanted)
    else:
        given = sorted(layer for group in wanted for layer in group)
        if given != sorted(layers):
            raise ValueError(
                f"--layer-groups {spec} covers layers {given} but the run harvests layers {sorted(layers)}; "
                "every harvested layer must be in exactly one group"
            )
        index_groups = [sorted(layers.index(layer) for layer in group) for group in wanted]
    groups = {group_name([sites[i] for i in g]): [sites[i] for i in g] for g in index_groups}
    layer_groups = [[layers[i] for i in g] for g in index_groups]
    consecutive = all(g == list(range(g[0], g[-1] + 1)) for g in layer_groups)
    explicit = ",".join(f"{g[0]}-{g[-1]}" for g in layer_groups) if consecutive else spec
    record = {
        "spec": spec, "sites": sites, "groups": groups,
    }
    if similarity is not None:
        record.update(
            similarity=similarity.tolist(), amad=analysis.amad(similarity, index_groups),
            similarity_tokens=int(first_batch[sites[0]].shape[0]),
        )
    return Grouping(groups, explicit, record)


def group_batches(
    batches: Iterator[Batch], groups: dict[str, list[str]], rows: str, seed: int, start: int = 0
) -> Iterator[Batch]:
    """{site: [B, d]} batches -> {group: rows}: all = every member's B rows ([k*B, d]); one = for
    each token the row of one member drawn at random ([B, d]). The draws of batch i depend only on
    (seed, i), so a stream continued at batch `start` groups exactly as an uninterrupted one."""
    for index, batch in enumerate(batches, start):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        out = {}
        for name, members in groups.items():
            if rows == "all" or len(members) == 1:
                out[name] = torch.cat([batch[s] for s in members])
                continue
            stacked = torch.stack([batch[s] for s in members])  # [k, B, d]
            n = stacked.shape[1]
            pick = torch.randint(len(members), (n,), generator=generator).to(stacked.device)
            out[name] = stacked[pick, torch.arange(n, device=stacked.device)]
        yield out


def share_by_group(
    source: DataSource, spec: str, rows: str, seed: int, resume: bool = False
) -> tuple[DataSource, Grouping]:
    """The source with one stream entry per layer group instead of per site. The groups are chosen
    (auto:G) or checked on the stream's first batch, which still trains; a resume's groups are
    explicit and need no batch, so it continues the stream without harvesting one to choose them."""
    if not resume:
        first = next(source.batches)
        grouping = choose_groups(first, spec)
        batches = itertools.chain([first], source.batches)
    else:
        grouping = choose_groups(source.widths, spec)
        batches = source.batches
    widths = {name: source.widths[members[0]] for name, members in grouping.groups.items()}

    def continue_at(run_dir, step):
        continued, start = source.continue_at(run_dir, step)
        return group_batches(continued, grouping.groups, rows, seed, start), start

    grouped = group_batches(batches, grouping.groups, rows, seed)
    return replace(
        source, widths=widths, batches=grouped, members=grouping.groups,
        continue_at=None if source.continue_at is None else continue_at,
    ), grouping
