"""Plans: what each account plan (free, standard, agency) allows, as seed 004 says.

- `sendResume` (quarantine summaries) is not available on the free plan;
- `resumeTemplateSubject`, `resumeTemplateBody`, `resumeTemplateResume`, `resumeLinkHostname`
  and `resumeReplyTo` are available on the agency plan only;
- every plan refills its monthly token tank with its own allowance at each month start.

The allowances come from the TOML tables `[plans.free]`, `[plans.standard]` and
`[plans.agency]`, key `monthly_tokens` (defaults in DEFAULT_MONTHLY_TOKENS). What a plan
allows is checked when a setting is written (the API answers 403 with the plan's name); a
feature used later (digests) must ask `Plan.send_resume` / `Plan.agency_options` again at
that time, since an account may have been moved to a smaller plan since.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailcore.config import ConfigError, unknown_key
from mailcore.identity import PLANS

DEFAULT_MONTHLY_TOKENS: dict[str, int] = {"free": 1_000, "standard": 50_000, "agency": 250_000}

# Domain options (DomainService spelling) that only the agency plan may set.
AGENCY_OPTIONS = (
    "resume_template_subject",
    "resume_template_body",
    "resume_template_resume",
    "resume_link_hostname",
    "resume_reply_to",
)
SEND_RESUME = "send_resume"


@dataclass(frozen=True)
class Plan:
    """One plan: its name, its monthly token allowance and the features it unlocks."""

    name: str
    monthly_tokens: int
    send_resume: bool
    agency_options: bool

    @property
    def label(self) -> str:
        """The name as the seed writes it ("Free", "Agency")."""
        return self.name.capitalize()

    def allows(self, option: str) -> bool:
        """Whether this plan may turn on the domain option `option` (DomainService name)."""
        if option == SEND_RESUME:
            return self.send_resume
        if option in AGENCY_OPTIONS:
            return self.agency_options
        return True

    def required_plan(self, option: str) -> str:
        """The smallest plan that allows `option` ("standard" or "agency")."""
        return "agency" if option in AGENCY_OPTIONS else "standard"


class PlanError(Exception):
    """A setting the account's plan does not allow. `option` is the DomainService name."""

    def __init__(self, option: str, plan: Plan) -> None:
        self.option = option
        self.plan = plan
        self.required = plan.required_plan(option)
        super().__init__(self.describe(option))

    def describe(self, shown_name: str) -> str:
        """The message, naming the option as the caller's audience spells it."""
        if self.required == "agency":
            needs = "only on the Agency plan"
        else:
            needs = "on the Standard and Agency plans, not on the Free plan"
        return f"{shown_name} is available {needs}; this account is on the {self.plan.label} plan."


def _enabled(value: Any) -> bool:
    """Whether a domain option value turns the feature on (None, "" and False do not)."""
    return value is not None and value != "" and value is not False


class Plans:
    """Every plan by name."""

    def __init__(self, monthly_tokens: Mapping[str, int] | None = None) -> None:
        allowances = {**DEFAULT_MONTHLY_TOKENS, **(monthly_tokens or {})}
        self._plans = {
            name: Plan(
                name=name,
                monthly_tokens=allowances[name],
                send_resume=name != "free",
                agency_options=name == "agency",
            )
            for name in PLANS
        }

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> Plans:
        """Plans from the TOML table `[plans]` (sub-tables `[plans.<name>]`)."""
        allowances: dict[str, int] = {}
        for name, table in section.items():
            if name not in PLANS:
                raise ConfigError(f"[plans] unknown plan {name!r} (plans: {', '.join(PLANS)})")
            if not isinstance(table, dict):
                raise ConfigError(f"[plans.{name}] must be a table")
            for key, value in table.items():
                if key != "monthly_tokens":
                    raise unknown_key(f"plans.{name}", key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(
                        f"[plans.{name}] monthly_tokens must be a non-negative integer"
                    )
                allowances[name] = value
        return cls(allowances)

    def __getitem__(self, name: str) -> Plan:
        """The plan called `name`; an unknown name (a row written by hand) is the free plan."""
        return self._plans.get(name, self._plans["free"])

    def monthly_tokens(self, name: str) -> int:
        return self[name].monthly_tokens

    def check_domain_options(
        self,
        plan_name: str,
        options: Mapping[str, Any],
        current: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise PlanError for the first option in `options` that `plan_name` may not set.

        Turning a feature off is always allowed, and so is sending back a value equal to
        the stored one (`current`), so that an account moved to a smaller plan can still
        update its other settings with the object it read.
        """
        plan = self[plan_name]
        for option, value in options.items():
            if plan.allows(option) or not _enabled(value):
                continue
            if current is not None and current.get(option) == value:
                continue
            raise PlanError(option, plan)
