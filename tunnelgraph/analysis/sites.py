"""Sites (clonable channels) and the analysis report that lists every group, legal or not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from tunnelgraph.analysis.groups import ChannelGroup, channel_groups, check_through
from tunnelgraph.analysis.reducibility import Finding, UnitMeasures, Weights, parametric_findings
from tunnelgraph.errors import SiteError
from tunnelgraph.ir import Graph


@dataclass(frozen=True)
class Site:
    """One channel (hidden unit or conv filter) that can be cloned function-preservingly.

    Attributes:
        name: ``"<group>[<channel>]"``, e.g. ``"features.3[7]"``; stable across
            runs and human-readable. The group is named after its first
            producer.
        channel: index of the channel in its group.
        inbound_size: K, the channel's inbound weights across all producers,
            biases included (the rows of the paper's A). Per-channel
            parameters cloned along (batch norm, depthwise conv) are not
            inbound weights and are not counted.
        outbound_size: L, the channel's outbound weights across all
            consumers (the columns of A, and the length of a vector lambda).
        producers: qualified names of the layers whose inbound weights
            (rows along axis 0) the site touches.
        consumers: qualified names of the layers whose outbound weights
            (columns along the input-channel axis) the site touches.
        through: per-channel layers cloned with the channel.
        group: the full layout of the channel's group (which parameter
            entries move); rewrites read it.

    Lambda order: a vector ``lam`` lists the outbound weights consumer by
    consumer, in the order of ``consumers``; within a consumer it is the
    row-major order of its weight restricted to this channel's input
    columns: ``(out_unit, kh, kw)`` for a conv consumer and
    ``(out_unit, pixel)`` for a linear consumer after a flatten.
    """

    name: str
    channel: int
    inbound_size: int
    outbound_size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    through: tuple[str, ...]
    group: ChannelGroup = field(repr=False, compare=False)

    @property
    def group_name(self) -> str:
        return self.group.name

    @classmethod
    def of(cls, group: ChannelGroup, channel: int) -> "Site":
        """The site of ``channel`` in ``group`` (which must be legal)."""
        if not group.legal:
            raise SiteError(f"group '{group.name}' has no legal sites: {'; '.join(group.reasons)}")
        if not 0 <= channel < group.size:
            raise SiteError(
                f"channel {channel} is out of range for group '{group.name}' of {group.size} channels"
            )
        return cls(
            name=f"{group.name}[{channel}]",
            channel=channel,
            inbound_size=group.inbound_size,
            outbound_size=group.outbound_size,
            producers=group.producers,
            consumers=group.consumers,
            through=group.through,
            group=group,
        )


def sites_of(groups: Iterable[ChannelGroup]) -> list[Site]:
    """Every channel of every legal group, group by group."""
    return [Site.of(group, channel) for group in groups if group.legal for channel in range(group.size)]


@dataclass(frozen=True)
class AnalysisReport:
    """Every hidden channel group of a model: its layout, why it is or is not clonable, and which units are reducible.

    Attributes:
        model: the model's name.
        through: the per-channel operations sites may pass.
        groups: every channel group, legal or not.
        reducibility: the units the weights prove reducible (Sussmann,
            docs/MATH.md section 2), when the weights were available.
        measures: every unit's empirical reducibility measures (outbound
            norm, activation std, best affine partner), when data was given.
    """

    model: str
    through: tuple[str, ...]
    groups: tuple[ChannelGroup, ...]
    reducibility: tuple[Finding, ...] = ()
    measures: tuple[UnitMeasures, ...] = ()

    @property
    def sites(self) -> list[Site]:
        return sites_of(self.groups)

    @property
    def blocked(self) -> list[ChannelGroup]:
        return [group for group in self.groups if not group.legal]

    def site(self, name: str) -> Site:
        """The site called ``name`` (``"group[channel]"``)."""
        return find_site(self.groups, name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "through": list(self.through),
            "sites": len(self.sites),
            "groups": [
                {
                    "name": group.name,
                    "size": group.size,
                    "legal": group.legal,
                    "reasons": list(group.reasons),
                    "producers": list(group.producers),
                    "consumers": list(group.consumers),
                    "through": list(group.through),
                    "inbound_size": group.inbound_size,
                    "outbound_size": group.outbound_size,
                }
                for group in self.groups
            ],
            "reducibility": [finding.to_dict() for finding in self.reducibility],
            "measures": [measures.to_dict() for measures in self.measures],
        }

    def to_markdown(self) -> str:
        lines = [
            f"# tunnelgraph analysis: {self.model}",
            "",
            f"through: {', '.join(self.through) or '(none: the paper default)'}; "
            f"{len(self.sites)} sites in {sum(g.legal for g in self.groups)} of "
            f"{len(self.groups)} channel groups",
            "",
            "| group | channels | K | L | producers | consumers | status |",
            "|---|---|---|---|---|---|---|",
        ]
        for group in self.groups:
            status = "legal" if group.legal else "blocked: " + "; ".join(group.reasons)
            lines.append(
                f"| {group.name} | {group.size} | {group.inbound_size} | {group.outbound_size} | "
                f"{', '.join(group.producers)} | {', '.join(group.consumers) or '-'} | {status} |"
            )
        lines += ["", "## Reducibility (Sussmann)", ""]
        if not self.reducibility:
            lines.append("No unit is reducible from its weights alone.")
        else:
            lines += ["| unit | condition | evidence | action |", "|---|---|---|---|"]
            lines += [f"| {f.unit} | {f.condition} | {f.evidence} | {f.action} |" for f in self.reducibility]
        if self.measures:
            samples = self.measures[0].samples
            lines += [
                "", f"### Empirical measures ({samples} samples)", "",
                "| unit | outbound norm | activation mean | activation std | best partner | abs corr | fit |",
                "|---|---|---|---|---|---|---|",
            ]
            for m in self.measures:
                group = m.unit.rpartition("[")[0]
                partner = "-" if m.partner is None else f"{group}[{m.partner}]"
                lines.append(
                    f"| {m.unit} | {m.outbound_norm:.4g} | {m.mean:.4g} | {m.std:.4g} | {partner} | "
                    f"{m.correlation:.6f} | {m.slope:.4g} x + {m.intercept:.4g} |"
                )
        return "\n".join(lines) + "\n"


def analyze_graph(
    graph: Graph, through: Iterable[str] = (), weights: Weights | None = None, *, tol: float = 1e-12
) -> AnalysisReport:
    """The analysis report of an IR graph; with ``weights`` (name -> array) also its reducible units."""
    chosen = check_through(through)
    groups = tuple(channel_groups(graph, chosen))
    findings = tuple(parametric_findings(graph, groups, weights, tol=tol)) if weights is not None else ()
    return AnalysisReport(graph.name, chosen, groups, findings)


def find_site(groups: Iterable[ChannelGroup], name: str) -> Site:
    """Resolve ``"group[channel]"`` against ``groups``; errors list what exists."""
    group_name, _, rest = name.rpartition("[")
    groups = list(groups)
    if not group_name or not rest.endswith("]") or not rest[:-1].isdigit():
        raise SiteError(f"site name {name!r} is not of the form 'group[channel]', e.g. 'conv[3]'")
    for group in groups:
        if group.name == group_name:
            return Site.of(group, int(rest[:-1]))
    known = ", ".join(group.name for group in groups if group.legal) or "none"
    raise SiteError(f"no channel group named {group_name!r}; legal groups: {known}")
