//! The sizing expression language and the demand-driven desired count: table tests (every
//! variable, every operator and function, every error with its column, fallback, schedules) and
//! property tests (clamping, fallback, printed expressions parse back, decay to `min`).

mod common;

use chrono::TimeDelta;
use common::*;
use prebuilds_core::expr::{BinOp, Expr, Func, UnOp};
use prebuilds_core::*;
use proptest::prelude::*;

/// Inputs where every variable has a distinct value, so a swapped variable shows.
fn distinct() -> Inputs {
    Inputs {
        scheduled_target: 3,
        running: 4,
        eligible: 2,
        claims: [11, 12, 13, 14, 15],
        misses: [21, 22, 23, 24, 25],
        hour: 9,
        weekday: 1,
    }
}

fn eval(src: &str, inputs: &Inputs) -> Result<f64, EvalError> {
    Expression::parse(src)
        .unwrap_or_else(|e| panic!("{src}: {e}"))
        .evaluate(inputs)
}

#[test]
fn every_variable_reads_its_input() {
    let i = distinct();
    let cases = [
        ("scheduled_target", 3.0),
        ("running", 4.0),
        ("eligible", 2.0),
        ("claims_5m", 11.0),
        ("claims_10m", 12.0),
        ("claims_30m", 13.0),
        ("claims_60m", 14.0),
        ("claims_120m", 15.0),
        ("misses_5m", 21.0),
        ("misses_10m", 22.0),
        ("misses_30m", 23.0),
        ("misses_60m", 24.0),
        ("misses_120m", 25.0),
        ("hour", 9.0),
        ("weekday", 1.0),
    ];
    assert_eq!(cases.len(), Var::all().len(), "a variable has no case");
    for (src, want) in cases {
        assert_eq!(eval(src, &i), Ok(want), "{src}");
    }
}

#[test]
fn operators_and_functions() {
    let i = distinct();
    let cases: &[(&str, f64)] = &[
        (
            "max(scheduled_target, claims_30m / 3 + misses_30m)",
            23.0 + 13.0 / 3.0,
        ),
        ("min(1, 2, 0.5)", 0.5),
        ("max(1, 7, 3)", 7.0),
        ("ceil(2.1)", 3.0),
        ("floor(2.9)", 2.0),
        ("round(2.5)", 3.0),
        ("round(2.4)", 2.0),
        ("clamp(50, 1, 10)", 10.0),
        ("clamp(-5, 1, 10)", 1.0),
        ("clamp(5, 1, 10)", 5.0),
        ("clamp(5, 10, 1)", 10.0),
        ("if(hour >= 8 && hour < 18, 5, 1)", 5.0),
        ("if(weekday == 0 || weekday == 6, 0, 2)", 2.0),
        ("if(misses_5m > 0, misses_5m, 0)", 21.0),
        ("if(true, if(false, 1, 2), 3)", 2.0),
        ("if(eligible != running, 1, 0)", 1.0),
        ("if((1 < 2) == true, 1, 0)", 1.0),
        ("if(!(eligible <= 1), 1, 0)", 1.0),
        ("7 % 3", 1.0),
        ("-running + 10", 6.0),
        ("2 * (3 + 4) - 1", 13.0),
        ("  1+2   ", 3.0),
    ];
    for (src, want) in cases {
        assert_eq!(eval(src, &i), Ok(*want), "{src}");
    }
}

#[test]
fn errors_name_the_column_and_the_fault() {
    let cases: &[(&str, usize, &str)] = &[
        (
            "",
            1,
            "expected a number, a variable, a function or '(', found the end",
        ),
        ("claims_5m +", 12, "found the end of the expression"),
        (
            "claims_6m",
            1,
            "unknown variable 'claims_6m'; known: scheduled_target",
        ),
        ("1 + foo(2)", 5, "unknown function 'foo'; known: min, max"),
        (
            "max(1)",
            1,
            "max(a, b, …) takes two or more numbers; found 1 argument(s)",
        ),
        ("ceil(1, 2)", 1, "ceil(x) takes one number; found 2"),
        ("clamp(1, 2)", 1, "clamp(x, lo, hi) takes three numbers"),
        ("(1 + 2", 7, "expected ')' to close the '(' at column 1"),
        ("1 2", 3, "unexpected number 2 after a complete expression"),
        (
            "1 < 2",
            1,
            "the expression is a truth value, but it must be a number",
        ),
        ("1 < 2 < 3", 7, "comparisons do not chain"),
        (
            "1 + (2 > 1)",
            5,
            "'+' needs numbers, but this is a truth value",
        ),
        (
            "if(1, 2, 3)",
            4,
            "the condition of if(…) must be a truth value, but this is a number",
        ),
        (
            "if(true, 2, false)",
            13,
            "both branches of if(…) must have one type",
        ),
        ("1 && true", 1, "'&&' needs truth values"),
        ("-true", 2, "'-' needs a number, but this is a truth value"),
        ("1 = 1", 3, "unexpected character '='; compare with '=='"),
        (
            "x > 0 ? 1 : 0",
            7,
            "write a conditional as if(condition, then, else)",
        ),
        ("min", 1, "'min' is a function: write min(…)"),
        ("1.", 3, "expected digits after the decimal point"),
        (
            "max(1, 2",
            9,
            "expected ',' or ')' in the arguments of max(…)",
        ),
        ("true == 1", 6, "'==' compares values of one type"),
        ("1 # 2", 3, "unexpected character '#'"),
    ];
    for (src, column, want) in cases {
        let err = Expression::parse(src).expect_err(src);
        assert_eq!(err.column, *column, "{src}: {err}");
        assert!(
            err.to_string().contains(want),
            "{src}: got {err}, want {want}"
        );
        assert!(err
            .to_string()
            .starts_with(&format!("at column {column}: ")));
    }
}

#[test]
fn run_time_failures_are_values_naming_the_sub_expression() {
    let i = Inputs::default();
    let cases = [
        ("claims_5m / misses_5m", EvalErrorKind::DivisionByZero, "(claims_5m / misses_5m)"),
        ("7 % eligible", EvalErrorKind::DivisionByZero, "(7 % eligible)"),
        (
            "99999999999999999999999999999999999999 * 99999999999999999999999999999999999999 * 99999999999999999999999999999999999999 * 99999999999999999999999999999999999999 * 99999999999999999999999999999999999999 * 99999999999999999999999999999999999999 * 99999999999999999999999999999999999999 * 99999999999999999999999999999999999999 * 99999999999999999999999999999999999999",
            EvalErrorKind::Overflow,
            "*",
        ),
    ];
    for (src, kind, at) in cases {
        let err = eval(src, &i).expect_err(src);
        assert_eq!(err.kind, kind, "{src}");
        assert!(err.at.contains(at), "{src}: {}", err.at);
    }
    // The branch not taken is not evaluated.
    assert_eq!(
        eval("if(misses_5m > 0, claims_5m / misses_5m, 0)", &i),
        Ok(0.0)
    );
}

/// A preset with autoscaling, the given expression, and demand.
fn autoscaled(min: u32, max: u32, expression: Option<&str>) -> PresetSnapshot {
    let mut s = snapshot(preset(2));
    s.autoscaling = Some(Autoscaling {
        min,
        max,
        expression: expression.map(str::to_owned),
    });
    s
}

#[test]
fn desired_count_sources() {
    // No autoscaling: the base.
    let plain = snapshot(preset(2));
    assert_eq!(desired_count(&plain, now()).source, DesiredSource::Base);

    // An expression: its value, clamped.
    let s = autoscaled(0, 10, Some("scheduled_target * 3"));
    assert_eq!(
        desired_count(&s, now()),
        DesiredCount {
            count: 6,
            source: DesiredSource::Expression
        }
    );
    let s = autoscaled(0, 4, Some("scheduled_target * 3"));
    assert_eq!(desired_count(&s, now()).count, 4);
    let s = autoscaled(3, 10, Some("0 - 5"));
    assert_eq!(desired_count(&s, now()).count, 3);

    // A run-time failure: the scheduled target, clamped, with the failure.
    let s = autoscaled(0, 10, Some("claims_5m / misses_5m"));
    let got = desired_count(&s, now());
    assert_eq!(got.count, 2);
    assert!(matches!(
        got.source,
        DesiredSource::ExpressionFallback(ExpressionFailure::Eval(EvalError {
            kind: EvalErrorKind::DivisionByZero,
            ..
        }))
    ));
    assert_eq!(got.source.as_str(), "expression_fallback");
    let s = autoscaled(5, 10, Some("1 / 0"));
    assert_eq!(desired_count(&s, now()).count, 5, "fallback is clamped too");
    // A stored expression that does not parse (defence): fallback as well.
    let s = autoscaled(0, 10, Some("1 +"));
    assert!(matches!(
        desired_count(&s, now()).source,
        DesiredSource::ExpressionFallback(ExpressionFailure::Parse(_))
    ));

    // Inactive presets stay at 0 whatever autoscaling says.
    let mut s = autoscaled(3, 10, Some("9"));
    s.preset.version_is_active = false;
    assert_eq!(desired_count(&s, now()).count, 0);
    let mut s = autoscaled(3, 10, None);
    s.preset.desired_instances = None;
    assert_eq!(
        desired_count(&s, now()).source,
        DesiredSource::NotConfigured
    );

    // Built-in, no demand: min (scale to zero with min 0).
    assert_eq!(
        desired_count(&autoscaled(0, 10, None), now()),
        DesiredCount {
            count: 0,
            source: DesiredSource::Autoscaling
        }
    );
    assert_eq!(desired_count(&autoscaled(2, 10, None), now()).count, 2);
}

#[test]
fn hour_and_weekday_follow_the_preset_timezone() {
    // now() is Monday 2 June 2025 12:00 UTC = 21:00 in Tokyo, 05:00 in Los Angeles.
    let mut s = autoscaled(0, 1000, Some("hour + weekday * 100"));
    assert_eq!(desired_count(&s, now()).count, 112);
    s.preset.scheduling_timezone = "Asia/Tokyo".into();
    assert_eq!(desired_count(&s, now()).count, 121);
    s.preset.scheduling_timezone = "America/Los_Angeles".into();
    assert_eq!(desired_count(&s, now()).count, 105);
    // Sunday is 0.
    assert_eq!(desired_count(&s, at("2025-06-08T20:00:00Z")).count, 13);
}

#[test]
fn running_and_eligible_come_from_the_snapshot() {
    let mut s = autoscaled(0, 100, Some("running * 10 + eligible"));
    s.running = vec![
        running(0, now(), true),
        running(1, now(), false),
        running(2, now(), true),
    ];
    assert_eq!(desired_count(&s, now()).count, 32);
}

#[test]
fn built_in_policy_worked_example() {
    // The README's example: 12 claims and 3 misses in the last 10 minutes (1.5/min), 9 in the
    // last 5 (1.8/min), p90 create 3 minutes. λ = 1.8/min × 3 min = 5.4; headroom 2√5.4 = 4.65;
    // target ceil(10.05) = 11.
    let demand = Demand {
        claims: [8, 12, 12, 12, 12],
        misses: [1, 3, 3, 3, 3],
        create_p90_ms: Some(180_000),
        ..Demand::default()
    };
    let f = forecast(&demand);
    assert!((f.rate_per_sec * 60.0 - 1.8).abs() < 1e-9, "{f:?}");
    assert_eq!(f.rate_window, Some(5));
    assert!((f.expected - 5.4).abs() < 1e-9);
    assert_eq!(f.target, 11);
    let mut s = autoscaled(1, 8, None);
    s.demand = demand;
    assert_eq!(desired_count(&s, now()).count, 8, "clamped to max");

    // Without a measured create, the default lead time (2 min) is used.
    let f = forecast(&Demand {
        create_p90_ms: None,
        ..demand
    });
    assert_eq!(f.lead_time, TimeDelta::minutes(2));
}

#[test]
fn a_schedule_is_a_floor_under_the_built_in_policy() {
    let mut s = autoscaled(0, 20, None);
    s.preset.scheduling_timezone = "UTC".into();
    s.schedules = vec![Schedule {
        cron_expression: "* 8-18 * * 1-5".into(),
        desired_instances: 5,
    }];
    // 12:00 Monday, no demand: the schedule's 5.
    let got = desired_count(&s, now());
    assert_eq!(
        got,
        DesiredCount {
            count: 5,
            source: DesiredSource::Schedule { index: 0 }
        }
    );
    // High demand beats the floor.
    s.demand.claims = [50, 50, 50, 50, 50];
    let got = desired_count(&s, now());
    assert_eq!(got.source, DesiredSource::Autoscaling);
    assert!(got.count > 5);
    // Outside the schedule with no demand: min, not the base.
    s.demand = Demand::default();
    let got = desired_count(&s, at("2025-06-02T22:00:00Z"));
    assert_eq!(
        got,
        DesiredCount {
            count: 0,
            source: DesiredSource::Autoscaling
        }
    );
    // With an expression the schedule reaches it as scheduled_target.
    s.autoscaling.as_mut().unwrap().expression = Some("scheduled_target + 1".into());
    assert_eq!(desired_count(&s, now()).count, 6);
    assert_eq!(desired_count(&s, at("2025-06-02T22:00:00Z")).count, 3);
}

#[test]
fn the_planner_uses_the_autoscaled_count() {
    let mut s = autoscaled(0, 10, Some("misses_5m * 2"));
    s.demand.misses = [2, 2, 2, 2, 2];
    let p = plan(&s, now(), &ReconcileConfig::default());
    assert_eq!(p.state.desired, 4);
    assert_eq!(p.actions, vec![Action::Create { count: 4 }]);
    assert_eq!(p.desired.source, DesiredSource::Expression);
    // The execution guard re-evaluates the same count.
    assert_eq!(creates_to_execute(9, &s, &p, now()).count, 4);
    // Windows passed: the same pool at 0 deletes its prebuilds.
    s.demand.misses = [0; 5];
    s.running = vec![running(0, now(), true)];
    let p = plan(&s, now(), &ReconcileConfig::default());
    assert_eq!(
        p.actions,
        vec![Action::Delete {
            workspace_ids: vec![id(0)]
        }]
    );
}

// ------------------------------------------------------------------------------------------
// Properties

fn leaf() -> impl Strategy<Value = Expr> {
    prop_oneof![
        // Non-negative: a minus sign is a unary node.
        (0u32..1000, 0u32..4).prop_map(|(n, d)| Expr::Num(f64::from(n) / f64::from(1 << d))),
        prop::sample::select(Var::all()).prop_map(Expr::Var),
    ]
}

fn bool_leaf() -> impl Strategy<Value = Expr> {
    any::<bool>().prop_map(Expr::Bool)
}

/// Well-typed number expressions (and the truth values they use).
fn number_expr() -> impl Strategy<Value = Expr> {
    leaf().prop_recursive(4, 32, 3, |inner| {
        let cond = (
            inner.clone(),
            prop::sample::select(vec![
                BinOp::Lt,
                BinOp::Le,
                BinOp::Gt,
                BinOp::Ge,
                BinOp::Eq,
                BinOp::Ne,
            ]),
            inner.clone(),
        )
            .prop_map(|(a, op, b)| Expr::Binary(op, Box::new(a), Box::new(b)));
        let cond = prop_oneof![
            bool_leaf(),
            cond.clone(),
            (
                cond.clone(),
                prop::sample::select(vec![BinOp::And, BinOp::Or]),
                cond.clone()
            )
                .prop_map(|(a, op, b)| Expr::Binary(op, Box::new(a), Box::new(b))),
            cond.prop_map(|c| Expr::Unary(UnOp::Not, Box::new(c))),
        ];
        prop_oneof![
            (
                inner.clone(),
                prop::sample::select(vec![
                    BinOp::Add,
                    BinOp::Sub,
                    BinOp::Mul,
                    BinOp::Div,
                    BinOp::Rem
                ]),
                inner.clone()
            )
                .prop_map(|(a, op, b)| Expr::Binary(op, Box::new(a), Box::new(b))),
            inner
                .clone()
                .prop_map(|e| Expr::Unary(UnOp::Neg, Box::new(e))),
            (
                prop::sample::select(vec![Func::Min, Func::Max]),
                prop::collection::vec(inner.clone(), 2..4)
            )
                .prop_map(|(f, args)| Expr::Call(f, args)),
            (
                prop::sample::select(vec![Func::Ceil, Func::Floor, Func::Round]),
                inner.clone()
            )
                .prop_map(|(f, a)| Expr::Call(f, vec![a])),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(a, b, c)| Expr::Call(Func::Clamp, vec![a, b, c])),
            (cond, inner.clone(), inner).prop_map(|(c, a, b)| Expr::Call(Func::If, vec![c, a, b])),
        ]
    })
}

fn inputs() -> impl Strategy<Value = Inputs> {
    (
        0u32..50,
        0u32..50,
        0u32..50,
        prop::array::uniform5(0u32..100),
        prop::array::uniform5(0u32..100),
        0u32..24,
        0u32..7,
    )
        .prop_map(
            |(scheduled_target, running, eligible, claims, misses, hour, weekday)| Inputs {
                scheduled_target,
                running,
                eligible,
                claims,
                misses,
                hour,
                weekday,
            },
        )
}

fn demand() -> impl Strategy<Value = Demand> {
    (
        prop::array::uniform5(0u32..200),
        prop::array::uniform5(0u32..200),
        prop::option::of(1i64..3_600_000),
    )
        .prop_map(|(claims, misses, create_p90_ms)| Demand {
            claims,
            misses,
            create_p90_ms,
            ..Demand::default()
        })
}

proptest! {
    /// Printing a tree and parsing the text gives the same tree, and the same value.
    #[test]
    fn printed_expressions_parse_back(tree in number_expr(), i in inputs()) {
        let text = tree.to_string();
        let parsed = Expression::parse(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(parsed.root(), &tree);
        prop_assert_eq!(Expression::parse(&parsed.to_string()).unwrap(), parsed.clone());
        let again = Expression::parse(&text).unwrap().evaluate(&i);
        prop_assert_eq!(parsed.evaluate(&i), again);
    }

    /// Whatever an expression yields — a value or a failure — the desired count is within
    /// [min, max], and a failure gives the clamped scheduled target.
    #[test]
    fn desired_is_clamped_and_failures_fall_back(
        tree in number_expr(),
        min in 0u32..10,
        span in 0u32..20,
        base in 0i32..30,
        d in demand(),
    ) {
        let max = min + span;
        let mut s = autoscaled(min, max, Some(&tree.to_string()));
        s.preset.desired_instances = Some(base);
        s.demand = d;
        let got = desired_count(&s, now());
        prop_assert!(got.count >= min && got.count <= max, "{} not in [{min}, {max}]", got.count);
        match &got.source {
            DesiredSource::Expression => {}
            DesiredSource::ExpressionFallback(ExpressionFailure::Eval(_)) => {
                prop_assert_eq!(got.count, (base as u32).clamp(min, max));
            }
            other => prop_assert!(false, "unexpected source {other:?}"),
        }
    }

    /// The built-in policy stays within [min, max], grows with demand, and with no demand left
    /// (every window passed) decays to exactly min.
    #[test]
    fn built_in_policy_is_clamped_monotone_and_decays_to_min(
        min in 0u32..5,
        span in 0u32..40,
        d in demand(),
        extra in 0u32..50,
    ) {
        let max = min + span;
        let mut s = autoscaled(min, max, None);
        s.demand = d;
        let got = desired_count(&s, now()).count;
        prop_assert!(got >= min && got <= max);

        let mut more = s.clone();
        more.demand.misses[0] += extra;
        prop_assert!(desired_count(&more, now()).count >= got);

        s.demand.claims = [0; 5];
        s.demand.misses = [0; 5];
        prop_assert_eq!(desired_count(&s, now()), DesiredCount { count: min, source: DesiredSource::Autoscaling });
    }

    /// Without autoscaling nothing changes: the scheduled count is the desired count.
    #[test]
    fn no_autoscaling_no_change(base in 0i32..30, d in demand()) {
        let mut s = snapshot(preset(base));
        s.demand = d;
        prop_assert_eq!(desired_count(&s, now()), desired_instances(&s.preset, &s.schedules, now()));
    }
}
