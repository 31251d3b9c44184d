"""Plans: which domain options each plan allows, the monthly allowances and their config."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from mailcore.billing.plans import AGENCY_OPTIONS, DEFAULT_MONTHLY_TOKENS, PlanError, Plans
from mailcore.config import ConfigError


class PlanRulesTests(TestCase):
    def setUp(self) -> None:
        self.plans = Plans()

    def test_send_resume_is_refused_on_free_only(self) -> None:
        with self.assertRaises(PlanError) as caught:
            self.plans.check_domain_options("free", {"send_resume": True})
        self.assertEqual((caught.exception.option, caught.exception.required),
                         ("send_resume", "standard"))
        self.assertIn("Free plan", str(caught.exception))
        for plan in ("standard", "agency"):
            self.plans.check_domain_options(plan, {"send_resume": True})

    def test_agency_options_are_refused_below_agency(self) -> None:
        for option in AGENCY_OPTIONS:
            for plan in ("free", "standard"):
                with self.assertRaises(PlanError) as caught:
                    self.plans.check_domain_options(plan, {option: "x@example.test"})
                self.assertEqual(caught.exception.required, "agency")
                self.assertIn("only on the Agency plan", caught.exception.describe(option))
            self.plans.check_domain_options("agency", {option: "x@example.test"})

    def test_turning_a_feature_off_is_always_allowed(self) -> None:
        self.plans.check_domain_options(
            "free",
            {"send_resume": False, "resume_template_subject": None, "resume_reply_to": "",
             "spam_action": 1, "redirect_to": "mx.example.test"},
        )

    def test_echoing_the_stored_value_is_allowed_after_a_downgrade(self) -> None:
        stored = {"send_resume": True, "resume_template_subject": "Quarantine"}
        self.plans.check_domain_options("free", stored, stored)
        with self.assertRaises(PlanError):
            self.plans.check_domain_options(
                "free", {"resume_template_subject": "Other"}, stored
            )

    def test_an_unknown_plan_name_is_treated_as_free(self) -> None:
        self.assertEqual(self.plans["gold"].name, "free")
        with self.assertRaises(PlanError):
            self.plans.check_domain_options("gold", {"send_resume": True})


class PlanConfigTests(TestCase):
    def test_defaults(self) -> None:
        plans = Plans.from_config({})
        for name, tokens in DEFAULT_MONTHLY_TOKENS.items():
            self.assertEqual(plans.monthly_tokens(name), tokens)

    def test_monthly_tokens_per_plan(self) -> None:
        plans = Plans.from_config({"free": {"monthly_tokens": 10}, "agency": {"monthly_tokens": 0}})
        self.assertEqual(plans.monthly_tokens("free"), 10)
        self.assertEqual(plans.monthly_tokens("agency"), 0)
        self.assertEqual(plans.monthly_tokens("standard"), DEFAULT_MONTHLY_TOKENS["standard"])

    def test_bad_config_is_refused(self) -> None:
        for section in (
            {"gold": {"monthly_tokens": 1}},
            {"free": 5},
            {"free": {"tokens": 5}},
            {"free": {"monthly_tokens": -1}},
            {"free": {"monthly_tokens": True}},
            {"free": {"monthly_tokens": "5"}},
        ):
            with self.assertRaises(ConfigError, msg=section):
                Plans.from_config(section)
