//! The sizing expression language of `autoscaling.expression`: parse and type-check
//! ([`Expression::parse`]), print ([`std::fmt::Display`], which parses back to the same tree), and
//! evaluate against a snapshot of counts and the clock ([`Expression::evaluate`]).
//!
//! The language is small on purpose: numbers, `true`/`false`, the variables of [`Var`],
//! arithmetic (`+ - * / %`, unary `-`), comparisons (`< <= > >= == !=`, which do not chain),
//! logic (`&& || !`), and the functions `min(a, b, …)`, `max(a, b, …)`, `ceil(x)`, `floor(x)`,
//! `round(x)`, `clamp(x, lo, hi)` and the conditional `if(condition, then, else)`. Every value
//! is a number (`f64`) or a truth value, and the whole expression must be a number.
//!
//! Type checking happens while parsing, so every fault — syntax or type — is reported with the
//! column where it is. What can only go wrong at run time (division by zero, a result that is not
//! a number or not finite) is an [`EvalError`] value: the caller falls back to the scheduled
//! target instead of failing the reconcile.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The claim and miss windows, in minutes, in the order of [`Inputs::claims`] and
/// [`Inputs::misses`].
pub const WINDOW_MINUTES: [u32; 5] = [5, 10, 30, 60, 120];

/// What an expression may read. Names are Coder's, so expressions port between the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Var {
    /// The count the base `instances` and the schedules ask for at this instant.
    ScheduledTarget,
    /// Running prebuilds (expired included).
    Running,
    /// Claimable prebuilds (running, ready, not expired).
    Eligible,
    /// Claims (hits) in the window `WINDOW_MINUTES[i]`.
    Claims(usize),
    /// Misses (a claim found no eligible prebuild) in the window `WINDOW_MINUTES[i]`.
    Misses(usize),
    /// Hour of the day, 0–23, in the preset's timezone (UTC without one).
    Hour,
    /// Day of the week, 0 = Sunday … 6 = Saturday, in the preset's timezone.
    Weekday,
}

impl Var {
    /// Every variable, in documentation order.
    pub fn all() -> Vec<Var> {
        let mut all = vec![Var::ScheduledTarget, Var::Running, Var::Eligible];
        all.extend((0..WINDOW_MINUTES.len()).map(Var::Claims));
        all.extend((0..WINDOW_MINUTES.len()).map(Var::Misses));
        all.extend([Var::Hour, Var::Weekday]);
        all
    }

    /// The variable's name in an expression.
    pub fn name(self) -> String {
        match self {
            Var::ScheduledTarget => "scheduled_target".into(),
            Var::Running => "running".into(),
            Var::Eligible => "eligible".into(),
            Var::Claims(i) => format!("claims_{}m", WINDOW_MINUTES[i]),
            Var::Misses(i) => format!("misses_{}m", WINDOW_MINUTES[i]),
            Var::Hour => "hour".into(),
            Var::Weekday => "weekday".into(),
        }
    }

    fn from_name(name: &str) -> Option<Var> {
        Var::all().into_iter().find(|v| v.name() == name)
    }
}

/// Built-in functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Func {
    Min,
    Max,
    Ceil,
    Floor,
    Round,
    Clamp,
    If,
}

impl Func {
    const ALL: [Func; 7] = [
        Func::Min,
        Func::Max,
        Func::Ceil,
        Func::Floor,
        Func::Round,
        Func::Clamp,
        Func::If,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Func::Min => "min",
            Func::Max => "max",
            Func::Ceil => "ceil",
            Func::Floor => "floor",
            Func::Round => "round",
            Func::Clamp => "clamp",
            Func::If => "if",
        }
    }

    /// How the arguments are written, for error messages.
    fn signature(self) -> &'static str {
        match self {
            Func::Min => "min(a, b, …) takes two or more numbers",
            Func::Max => "max(a, b, …) takes two or more numbers",
            Func::Ceil => "ceil(x) takes one number",
            Func::Floor => "floor(x) takes one number",
            Func::Round => "round(x) takes one number",
            Func::Clamp => "clamp(x, lo, hi) takes three numbers",
            Func::If => "if(condition, then, else) takes a truth value and two values of one type",
        }
    }

    fn from_name(name: &str) -> Option<Func> {
        Func::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Unary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Not,
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }
}

/// A syntax tree. Numbers are never negative here: `-3` is `Neg(3)`.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(f64),
    Bool(bool),
    Var(Var),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

/// The two types of the language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Number,
    Bool,
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Number => "a number",
            Type::Bool => "a truth value",
        })
    }
}

/// A syntax or type error at a column (1-based, in characters) of the expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at column {column}: {message}")]
pub struct ParseError {
    pub column: usize,
    pub message: String,
}

/// What went wrong while evaluating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalErrorKind {
    DivisionByZero,
    NotANumber,
    Overflow,
}

/// A run-time failure: its kind and the (printed) sub-expression that produced it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} in {at}", match kind {
    EvalErrorKind::DivisionByZero => "division by zero",
    EvalErrorKind::NotANumber => "result is not a number",
    EvalErrorKind::Overflow => "result is too large",
})]
pub struct EvalError {
    pub kind: EvalErrorKind,
    pub at: String,
}

/// The values an expression reads, gathered by the shell and the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Inputs {
    pub scheduled_target: u32,
    pub running: u32,
    pub eligible: u32,
    /// Claims per window of [`WINDOW_MINUTES`].
    pub claims: [u32; 5],
    /// Misses per window of [`WINDOW_MINUTES`].
    pub misses: [u32; 5],
    pub hour: u32,
    pub weekday: u32,
}

impl Inputs {
    pub fn get(&self, var: Var) -> f64 {
        f64::from(match var {
            Var::ScheduledTarget => self.scheduled_target,
            Var::Running => self.running,
            Var::Eligible => self.eligible,
            Var::Claims(i) => self.claims[i],
            Var::Misses(i) => self.misses[i],
            Var::Hour => self.hour,
            Var::Weekday => self.weekday,
        })
    }
}

/// A parsed and type-checked expression whose value is a number.
#[derive(Debug, Clone, PartialEq)]
pub struct Expression {
    root: Expr,
}

impl Expression {
    /// Parses and type-checks `source`.
    pub fn parse(source: &str) -> Result<Expression, ParseError> {
        let tokens = lex(source)?;
        let mut parser = Parser {
            tokens,
            pos: 0,
            end_column: source.chars().count() + 1,
        };
        let typed = parser.expr()?;
        if let Some(token) = parser.peek() {
            return Err(parser.error_at(
                token.column,
                format!(
                    "unexpected {} after a complete expression",
                    token.kind.describe()
                ),
            ));
        }
        if typed.ty != Type::Number {
            return Err(ParseError {
                column: typed.column,
                message: format!(
                    "the expression is {}, but it must be a number (the desired count); \
                     wrap it in if(…, a, b)",
                    typed.ty
                ),
            });
        }
        Ok(Expression { root: typed.expr })
    }

    pub fn root(&self) -> &Expr {
        &self.root
    }

    /// Evaluates the expression; the value is any finite number (the caller rounds and clamps).
    pub fn evaluate(&self, inputs: &Inputs) -> Result<f64, EvalError> {
        eval_num(&self.root, inputs)
    }
}

impl fmt::Display for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt(f)
    }
}

/// Fully parenthesised, so printing never depends on precedence and always parses back.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Num(n) => write!(f, "{n}"),
            Expr::Bool(b) => write!(f, "{b}"),
            Expr::Var(v) => f.write_str(&v.name()),
            Expr::Unary(UnOp::Neg, e) => write!(f, "(-{e})"),
            Expr::Unary(UnOp::Not, e) => write!(f, "(!{e})"),
            Expr::Binary(op, a, b) => write!(f, "({a} {} {b})", op.symbol()),
            Expr::Call(func, args) => {
                write!(f, "{}(", func.name())?;
                for (i, arg) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    arg.fmt(f)?;
                }
                f.write_str(")")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum TokenKind {
    Num(f64),
    Ident(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

impl TokenKind {
    fn describe(&self) -> String {
        match self {
            TokenKind::Num(n) => format!("number {n}"),
            TokenKind::Ident(name) => format!("'{name}'"),
            TokenKind::Op(op) => format!("'{op}'"),
            TokenKind::LParen => "'('".into(),
            TokenKind::RParen => "')'".into(),
            TokenKind::Comma => "','".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokenKind,
    column: usize,
}

/// Two-character operators first, so `<=` is not read as `<` then `=`.
const OPERATORS: [&str; 16] = [
    "<=", ">=", "==", "!=", "&&", "||", "+", "-", "*", "/", "%", "<", ">", "!", "?", ":",
];

fn lex(source: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            if i < chars.len() && chars[i] == '.' {
                i += 1;
                let fraction = i;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                if i == fraction {
                    return Err(ParseError {
                        column: i + 1,
                        message: "expected digits after the decimal point".into(),
                    });
                }
            }
            let text: String = chars[start..i].iter().collect();
            // Digits with at most one point always parse; the guard is for the invariant's sake.
            let value = text.parse::<f64>().map_err(|_| ParseError {
                column,
                message: format!("'{text}' is not a number"),
            })?;
            tokens.push(Token {
                kind: TokenKind::Num(value),
                column,
            });
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(Token {
                kind: TokenKind::Ident(chars[start..i].iter().collect()),
                column,
            });
            continue;
        }
        let simple = match c {
            '(' => Some(TokenKind::LParen),
            ')' => Some(TokenKind::RParen),
            ',' => Some(TokenKind::Comma),
            _ => None,
        };
        if let Some(kind) = simple {
            tokens.push(Token { kind, column });
            i += 1;
            continue;
        }
        let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
        match OPERATORS.iter().find(|op| rest.starts_with(**op)) {
            Some(op) if *op == "?" || *op == ":" => {
                return Err(ParseError {
                    column,
                    message: format!(
                        "'{op}' is not an operator here; write a conditional as \
                         if(condition, then, else)"
                    ),
                })
            }
            Some(op) => {
                tokens.push(Token {
                    kind: TokenKind::Op(op),
                    column,
                });
                i += op.len();
            }
            None => {
                let hint = match c {
                    '=' => "; compare with '=='",
                    '&' => "; 'and' is '&&'",
                    '|' => "; 'or' is '||'",
                    _ => "",
                };
                return Err(ParseError {
                    column,
                    message: format!("unexpected character '{c}'{hint}"),
                });
            }
        }
    }
    Ok(tokens)
}

// ---------------------------------------------------------------------------------------------
// Parser and type checker

/// A checked sub-expression: its tree, its type and the column where it starts.
struct Typed {
    expr: Expr,
    ty: Type,
    column: usize,
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    /// The column just past the end, for "expected … found end of expression".
    end_column: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_op(&self) -> Option<&'static str> {
        match self.peek().map(|t| &t.kind) {
            Some(TokenKind::Op(op)) => Some(op),
            _ => None,
        }
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        token
    }

    fn error_at(&self, column: usize, message: String) -> ParseError {
        ParseError { column, message }
    }

    /// "expected X, found Y" at the current token (or the end).
    fn expected(&self, what: &str) -> ParseError {
        match self.peek() {
            Some(token) => self.error_at(
                token.column,
                format!("expected {what}, found {}", token.kind.describe()),
            ),
            None => self.error_at(
                self.end_column,
                format!("expected {what}, found the end of the expression"),
            ),
        }
    }

    fn expr(&mut self) -> Result<Typed, ParseError> {
        self.logic(BinOp::Or)
    }

    /// `||` binds looser than `&&`; both take truth values.
    fn logic(&mut self, op: BinOp) -> Result<Typed, ParseError> {
        let operand = |p: &mut Parser| match op {
            BinOp::Or => p.logic(BinOp::And),
            _ => p.comparison(),
        };
        let mut left = operand(self)?;
        while self.peek_op() == Some(op.symbol()) {
            let column = self.next().map_or(self.end_column, |t| t.column);
            let right = operand(self)?;
            left = binary(op, left, right, column)?;
        }
        Ok(left)
    }

    /// One comparison at most: `a < b < c` is refused rather than given a surprising meaning.
    fn comparison(&mut self) -> Result<Typed, ParseError> {
        let left = self.additive()?;
        let Some(op) = self.peek_op().and_then(comparison_op) else {
            return Ok(left);
        };
        let column = self.next().map_or(self.end_column, |t| t.column);
        let right = self.additive()?;
        let combined = binary(op, left, right, column)?;
        if let Some(next) = self.peek_op().and_then(comparison_op) {
            let at = self.peek().map_or(self.end_column, |t| t.column);
            return Err(self.error_at(
                at,
                format!(
                    "comparisons do not chain: '{}' follows another comparison; \
                     join them with &&",
                    next.symbol()
                ),
            ));
        }
        Ok(combined)
    }

    fn additive(&mut self) -> Result<Typed, ParseError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = match self.peek_op() {
                Some("+") => BinOp::Add,
                Some("-") => BinOp::Sub,
                _ => return Ok(left),
            };
            let column = self.next().map_or(self.end_column, |t| t.column);
            let right = self.multiplicative()?;
            left = binary(op, left, right, column)?;
        }
    }

    fn multiplicative(&mut self) -> Result<Typed, ParseError> {
        let mut left = self.unary()?;
        loop {
            let op = match self.peek_op() {
                Some("*") => BinOp::Mul,
                Some("/") => BinOp::Div,
                Some("%") => BinOp::Rem,
                _ => return Ok(left),
            };
            let column = self.next().map_or(self.end_column, |t| t.column);
            let right = self.unary()?;
            left = binary(op, left, right, column)?;
        }
    }

    fn unary(&mut self) -> Result<Typed, ParseError> {
        let (op, want) = match self.peek_op() {
            Some("-") => (UnOp::Neg, Type::Number),
            Some("!") => (UnOp::Not, Type::Bool),
            _ => return self.primary(),
        };
        let column = self.next().map_or(self.end_column, |t| t.column);
        let operand = self.unary()?;
        if operand.ty != want {
            let symbol = if op == UnOp::Neg { "-" } else { "!" };
            return Err(self.error_at(
                operand.column,
                format!("'{symbol}' needs {want}, but this is {}", operand.ty),
            ));
        }
        Ok(Typed {
            expr: Expr::Unary(op, Box::new(operand.expr)),
            ty: want,
            column,
        })
    }

    fn primary(&mut self) -> Result<Typed, ParseError> {
        let Some(token) = self.peek().cloned() else {
            return Err(self.expected("a number, a variable, a function or '('"));
        };
        let column = token.column;
        match token.kind {
            TokenKind::Num(n) => {
                self.pos += 1;
                Ok(Typed {
                    expr: Expr::Num(n),
                    ty: Type::Number,
                    column,
                })
            }
            TokenKind::LParen => {
                self.pos += 1;
                let inner = self.expr()?;
                if self.peek().map(|t| &t.kind) != Some(&TokenKind::RParen) {
                    return Err(self.expected(&format!("')' to close the '(' at column {column}")));
                }
                self.pos += 1;
                Ok(Typed { column, ..inner })
            }
            TokenKind::Ident(name) => {
                self.pos += 1;
                let is_call = self.peek().map(|t| &t.kind) == Some(&TokenKind::LParen);
                if is_call {
                    return self.call(&name, column);
                }
                match name.as_str() {
                    "true" | "false" => Ok(Typed {
                        expr: Expr::Bool(name == "true"),
                        ty: Type::Bool,
                        column,
                    }),
                    _ => match Var::from_name(&name) {
                        Some(var) => Ok(Typed {
                            expr: Expr::Var(var),
                            ty: Type::Number,
                            column,
                        }),
                        None if Func::from_name(&name).is_some() => Err(self
                            .error_at(column, format!("'{name}' is a function: write {name}(…)"))),
                        None => Err(self.error_at(
                            column,
                            format!(
                                "unknown variable '{name}'; known: {}",
                                Var::all()
                                    .into_iter()
                                    .map(Var::name)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )),
                    },
                }
            }
            _ => Err(self.expected("a number, a variable, a function or '('")),
        }
    }

    /// `name(` has been seen up to the name; checks the arity and the argument types.
    fn call(&mut self, name: &str, column: usize) -> Result<Typed, ParseError> {
        let Some(func) = Func::from_name(name) else {
            return Err(self.error_at(
                column,
                format!(
                    "unknown function '{name}'; known: {}",
                    Func::ALL.map(Func::name).join(", ")
                ),
            ));
        };
        self.pos += 1; // the '('
        let mut args = Vec::new();
        if self.peek().map(|t| &t.kind) != Some(&TokenKind::RParen) {
            loop {
                args.push(self.expr()?);
                match self.peek().map(|t| &t.kind) {
                    Some(TokenKind::Comma) => self.pos += 1,
                    Some(TokenKind::RParen) => break,
                    _ => {
                        return Err(
                            self.expected(&format!("',' or ')' in the arguments of {name}(…)"))
                        )
                    }
                }
            }
        }
        self.pos += 1; // the ')'
        let arity_ok = match func {
            Func::Min | Func::Max => args.len() >= 2,
            Func::Ceil | Func::Floor | Func::Round => args.len() == 1,
            Func::Clamp | Func::If => args.len() == 3,
        };
        if !arity_ok {
            return Err(self.error_at(
                column,
                format!("{}; found {} argument(s)", func.signature(), args.len()),
            ));
        }
        let ty = if func == Func::If {
            expect(&args[0], Type::Bool, || {
                "the condition of if(…) must be a truth value".to_string()
            })?;
            if args[1].ty != args[2].ty {
                return Err(ParseError {
                    column: args[2].column,
                    message: format!(
                        "both branches of if(…) must have one type: the first is {}, this one is {}",
                        args[1].ty, args[2].ty
                    ),
                });
            }
            args[1].ty
        } else {
            for arg in &args {
                expect(arg, Type::Number, || {
                    format!("the arguments of {name}(…) must be numbers")
                })?;
            }
            Type::Number
        };
        Ok(Typed {
            expr: Expr::Call(func, args.into_iter().map(|a| a.expr).collect()),
            ty,
            column,
        })
    }
}

fn comparison_op(symbol: &str) -> Option<BinOp> {
    Some(match symbol {
        "<" => BinOp::Lt,
        "<=" => BinOp::Le,
        ">" => BinOp::Gt,
        ">=" => BinOp::Ge,
        "==" => BinOp::Eq,
        "!=" => BinOp::Ne,
        _ => return None,
    })
}

fn expect(arg: &Typed, want: Type, context: impl Fn() -> String) -> Result<(), ParseError> {
    if arg.ty == want {
        return Ok(());
    }
    Err(ParseError {
        column: arg.column,
        message: format!("{}, but this is {}", context(), arg.ty),
    })
}

/// Type rule of a binary operator; `column` is the operator's.
fn binary(op: BinOp, left: Typed, right: Typed, column: usize) -> Result<Typed, ParseError> {
    let symbol = op.symbol();
    let ty = match op {
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => {
            for side in [&left, &right] {
                expect(side, Type::Number, || format!("'{symbol}' needs numbers"))?;
            }
            Type::Number
        }
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            for side in [&left, &right] {
                expect(side, Type::Number, || {
                    format!("'{symbol}' compares numbers")
                })?;
            }
            Type::Bool
        }
        BinOp::Eq | BinOp::Ne => {
            if left.ty != right.ty {
                return Err(ParseError {
                    column,
                    message: format!(
                        "'{symbol}' compares values of one type, but the left is {} and the right is {}",
                        left.ty, right.ty
                    ),
                });
            }
            Type::Bool
        }
        BinOp::And | BinOp::Or => {
            for side in [&left, &right] {
                expect(side, Type::Bool, || {
                    format!("'{symbol}' needs truth values (comparisons such as misses_5m > 0)")
                })?;
            }
            Type::Bool
        }
    };
    Ok(Typed {
        expr: Expr::Binary(op, Box::new(left.expr), Box::new(right.expr)),
        ty,
        column: left.column,
    })
}

// ---------------------------------------------------------------------------------------------
// Evaluation

fn fail(kind: EvalErrorKind, at: &Expr) -> EvalError {
    EvalError {
        kind,
        at: at.to_string(),
    }
}

/// A finite number, or the error that names the sub-expression which produced it.
fn finite(value: f64, at: &Expr) -> Result<f64, EvalError> {
    if value.is_nan() {
        Err(fail(EvalErrorKind::NotANumber, at))
    } else if value.is_infinite() {
        Err(fail(EvalErrorKind::Overflow, at))
    } else {
        Ok(value)
    }
}

/// Evaluates a node the type checker typed as a number.
fn eval_num(expr: &Expr, inputs: &Inputs) -> Result<f64, EvalError> {
    let value = match expr {
        Expr::Num(n) => *n,
        Expr::Var(var) => inputs.get(*var),
        Expr::Unary(UnOp::Neg, e) => -eval_num(e, inputs)?,
        Expr::Binary(op, a, b) => {
            let (x, y) = (eval_num(a, inputs)?, eval_num(b, inputs)?);
            match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div | BinOp::Rem if y == 0.0 => {
                    return Err(fail(EvalErrorKind::DivisionByZero, expr))
                }
                BinOp::Div => x / y,
                BinOp::Rem => x % y,
                _ => return Err(fail(EvalErrorKind::NotANumber, expr)),
            }
        }
        // Lazy: only the branch taken is evaluated, so `if(misses_5m > 0, claims_5m /
        // misses_5m, 0)` never divides by zero.
        Expr::Call(Func::If, args) => {
            if eval_bool(&args[0], inputs)? {
                eval_num(&args[1], inputs)?
            } else {
                eval_num(&args[2], inputs)?
            }
        }
        Expr::Call(func, args) => {
            let values = args
                .iter()
                .map(|a| eval_num(a, inputs))
                .collect::<Result<Vec<_>, _>>()?;
            match (func, values.as_slice()) {
                (Func::Min, _) => values.iter().copied().fold(f64::INFINITY, f64::min),
                (Func::Max, _) => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                (Func::Ceil, [x]) => x.ceil(),
                (Func::Floor, [x]) => x.floor(),
                (Func::Round, [x]) => x.round(),
                // An inverted range is the expression's own fault: `lo` wins.
                (Func::Clamp, [x, lo, hi]) => x.min(*hi).max(*lo),
                // Arity was checked while parsing; anything else is reported, never a panic.
                _ => return Err(fail(EvalErrorKind::NotANumber, expr)),
            }
        }
        // The type checker only lets numbers reach here; a truth value is a bug, reported as a
        // value rather than a panic so a reconcile never crashes on it.
        Expr::Bool(_) | Expr::Unary(UnOp::Not, _) => {
            return Err(fail(EvalErrorKind::NotANumber, expr))
        }
    };
    finite(value, expr)
}

fn eval_bool(expr: &Expr, inputs: &Inputs) -> Result<bool, EvalError> {
    match expr {
        Expr::Bool(b) => Ok(*b),
        Expr::Unary(UnOp::Not, e) => Ok(!eval_bool(e, inputs)?),
        Expr::Binary(op, a, b) => match op {
            BinOp::And => Ok(eval_bool(a, inputs)? && eval_bool(b, inputs)?),
            BinOp::Or => Ok(eval_bool(a, inputs)? || eval_bool(b, inputs)?),
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                let (x, y) = (eval_num(a, inputs)?, eval_num(b, inputs)?);
                Ok(match op {
                    BinOp::Lt => x < y,
                    BinOp::Le => x <= y,
                    BinOp::Gt => x > y,
                    _ => x >= y,
                })
            }
            BinOp::Eq | BinOp::Ne => {
                // Both sides have one type (checked while parsing).
                let equal = match type_of(a) {
                    Type::Number => eval_num(a, inputs)? == eval_num(b, inputs)?,
                    Type::Bool => eval_bool(a, inputs)? == eval_bool(b, inputs)?,
                };
                Ok(if *op == BinOp::Eq { equal } else { !equal })
            }
            _ => Err(fail(EvalErrorKind::NotANumber, expr)),
        },
        Expr::Call(Func::If, args) => {
            if eval_bool(&args[0], inputs)? {
                eval_bool(&args[1], inputs)
            } else {
                eval_bool(&args[2], inputs)
            }
        }
        _ => Err(fail(EvalErrorKind::NotANumber, expr)),
    }
}

/// The type of a tree the parser accepted (the tree does not store it).
fn type_of(expr: &Expr) -> Type {
    match expr {
        Expr::Num(_) | Expr::Var(_) | Expr::Unary(UnOp::Neg, _) => Type::Number,
        Expr::Bool(_) | Expr::Unary(UnOp::Not, _) => Type::Bool,
        Expr::Binary(op, _, _) => match op {
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => Type::Number,
            _ => Type::Bool,
        },
        Expr::Call(Func::If, args) => args.get(1).map_or(Type::Number, type_of),
        Expr::Call(_, _) => Type::Number,
    }
}

/// Rounds `value` to the nearest whole count (halves away from zero) and clamps it to
/// `[min, max]`; negative values give `min`. `max < min` is treated as `max = min`.
pub fn clamp_count(value: f64, min: u32, max: u32) -> u32 {
    let max = max.max(min);
    let rounded = value.round();
    if rounded.is_nan() || rounded <= f64::from(min) {
        min
    } else if rounded >= f64::from(max) {
        max
    } else {
        // Strictly between two u32 values and whole: the cast is exact.
        rounded as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(src: &str, inputs: &Inputs) -> Result<f64, EvalError> {
        Expression::parse(src).unwrap().evaluate(inputs)
    }

    #[test]
    fn precedence_and_associativity() {
        let i = Inputs::default();
        let cases = [
            ("1 + 2 * 3", 7.0),
            ("(1 + 2) * 3", 9.0),
            ("10 - 4 - 3", 3.0),
            ("24 / 4 / 2", 3.0),
            ("7 % 4 + 1", 4.0),
            ("-2 * 3", -6.0),
            ("--2", 2.0),
            ("2 * -3", -6.0),
            ("if(1 < 2 && 2 < 3 || false, 1, 0)", 1.0),
            ("if(!(1 > 2), 5, 6)", 5.0),
            ("if(true || 1 / 0 > 0, 1, 0)", 1.0),
        ];
        for (src, want) in cases {
            assert_eq!(eval(src, &i), Ok(want), "{src}");
        }
    }

    #[test]
    fn printing_is_fully_parenthesised() {
        let e = Expression::parse("max(scheduled_target, claims_30m / 3 + misses_30m)").unwrap();
        assert_eq!(
            e.to_string(),
            "max(scheduled_target, ((claims_30m / 3) + misses_30m))"
        );
        assert_eq!(Expression::parse(&e.to_string()).unwrap(), e);
    }
}
