//! Which form a chat template wants `message.content` in, decided the way
//! vLLM 0.32's `--chat-template-content-format auto` decides it: by walking
//! the template's AST for a `for` loop over a message's content.
//!
//! The rule (vLLM's, reproduced on minijinja's AST): names bound to `messages`
//! (the variable itself, or `{% set x = messages... %}`, transitively) are
//! found; loops over them give message names; a template is "openai" when
//! some loop iterates over `<message>.content` / `<message>['content']`
//! (through filters, tests and slices), over a macro parameter that a call
//! passes such content to, or (outside macros) over a variable named
//! `content`. Anything else is "string" - in particular indexing
//! (`message['content'][0]['text']`) alone does not count, as in vLLM.
//!
//! Limits: scoping is ignored (as in vLLM); the walk is over minijinja's AST,
//! so a template minijinja cannot parse falls back to "string" (vLLM's default
//! when Jinja cannot parse it). Where vLLM's walk would trip on a tuple target
//! (`{% for a, b in messages %}`) it falls back to "string", and so does this.

use minijinja::machinery::ast::{CallArg, Expr, Stmt};

/// How message content is handed to the chat template (config values as
/// vLLM's `--chat-template-content-format`: `auto`, `string`, `openai`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentFormat {
    /// As vLLM's `auto`: detected from the template.
    #[default]
    Auto,
    /// Text parts joined with newlines into one string.
    String,
    /// A list of parts (`{"type": "text", "text": ...}`).
    OpenAi,
}

/// A resolved content format (never `Auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolved {
    String,
    OpenAi,
}

/// The content format vLLM detects for this template source.
pub(crate) fn detect(source: &str) -> Resolved {
    let Ok(ast) = minijinja::machinery::parse(source, "chat_template", Default::default()) else {
        return Resolved::String;
    };
    let mut nodes = Nodes::default();
    nodes.stmt(&ast, None);
    match nodes.loops_over_content() {
        Some(true) => Resolved::OpenAi,
        Some(false) | None => Resolved::String,
    }
}

struct Loop<'n, 'a> {
    target: &'n Expr<'a>,
    iter: &'n Expr<'a>,
    /// Index into `Nodes::macros` of the innermost enclosing macro.
    in_macro: Option<usize>,
}

struct MacroDef<'a> {
    name: &'a str,
    params: Vec<&'a str>,
}

/// Every assignment, loop, macro and call in the template, in source order
/// (what Jinja's `find_all` visits).
#[derive(Default)]
struct Nodes<'n, 'a> {
    sets: Vec<(&'n Expr<'a>, &'n Expr<'a>)>,
    loops: Vec<Loop<'n, 'a>>,
    macros: Vec<MacroDef<'a>>,
    calls: Vec<(&'n Expr<'a>, &'n [CallArg<'a>])>,
}

fn var<'a>(e: &Expr<'a>) -> Option<&'a str> {
    match e {
        Expr::Var(v) => Some(v.id),
        _ => None,
    }
}

/// vLLM's `_is_var_or_elems_access`: `name` (or `name.key` / `name['key']`),
/// possibly under filters, tests and slices.
fn accesses(e: &Expr<'_>, name: &str, key: Option<&str>) -> bool {
    match e {
        Expr::Filter(f) => f.expr.as_ref().is_some_and(|x| accesses(x, name, key)),
        Expr::Test(t) => accesses(&t.expr, name, key),
        Expr::Slice(s) => accesses(&s.expr, name, key),
        _ => match key {
            None => var(e) == Some(name),
            Some(key) => match e {
                Expr::GetAttr(g) => g.name == key && var(&g.expr) == Some(name),
                Expr::GetItem(g) => {
                    var(&g.expr) == Some(name)
                        && matches!(&g.subscript_expr, Expr::Const(c) if c.value.as_str() == Some(key))
                }
                _ => false,
            },
        },
    }
}

impl<'n, 'a> Nodes<'n, 'a> {
    fn body(&mut self, body: &'n [Stmt<'a>], in_macro: Option<usize>) {
        for s in body {
            self.stmt(s, in_macro);
        }
    }

    fn stmt(&mut self, s: &'n Stmt<'a>, in_macro: Option<usize>) {
        match s {
            Stmt::Template(t) => self.body(&t.children, in_macro),
            Stmt::EmitExpr(e) => self.expr(&e.expr),
            Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) => {}
            Stmt::ForLoop(f) => {
                self.loops.push(Loop {
                    target: &f.target,
                    iter: &f.iter,
                    in_macro,
                });
                self.expr(&f.target);
                self.expr(&f.iter);
                if let Some(e) = &f.filter_expr {
                    self.expr(e);
                }
                self.body(&f.body, in_macro);
                self.body(&f.else_body, in_macro);
            }
            Stmt::IfCond(i) => {
                self.expr(&i.expr);
                self.body(&i.true_body, in_macro);
                self.body(&i.false_body, in_macro);
            }
            Stmt::WithBlock(w) => {
                for (t, v) in &w.assignments {
                    self.expr(t);
                    self.expr(v);
                }
                self.body(&w.body, in_macro);
            }
            Stmt::Set(set) => {
                self.sets.push((&set.target, &set.expr));
                self.expr(&set.target);
                self.expr(&set.expr);
            }
            Stmt::SetBlock(b) => {
                if let Some(f) = &b.filter {
                    self.expr(f);
                }
                self.body(&b.body, in_macro);
            }
            Stmt::AutoEscape(a) => {
                self.expr(&a.enabled);
                self.body(&a.body, in_macro);
            }
            Stmt::FilterBlock(f) => {
                self.expr(&f.filter);
                self.body(&f.body, in_macro);
            }
            Stmt::Block(b) => self.body(&b.body, in_macro),
            Stmt::Import(i) => self.expr(&i.expr),
            Stmt::FromImport(i) => self.expr(&i.expr),
            Stmt::Extends(e) => self.expr(&e.name),
            Stmt::Include(i) => self.expr(&i.name),
            Stmt::Macro(m) => {
                let id = self.macros.len();
                self.macros.push(MacroDef {
                    name: m.name,
                    params: m.args.iter().filter_map(var).collect(),
                });
                for d in &m.defaults {
                    self.expr(d);
                }
                self.body(&m.body, Some(id));
            }
            // A call block's body is no macro to Jinja's AST (vLLM's walk sees a Call).
            Stmt::CallBlock(c) => {
                self.call(&c.call.expr, &c.call.args);
                self.body(&c.macro_decl.body, in_macro);
            }
            Stmt::Do(d) => self.call(&d.call.expr, &d.call.args),
        }
    }

    fn call(&mut self, callee: &'n Expr<'a>, args: &'n [CallArg<'a>]) {
        self.calls.push((callee, args));
        self.expr(callee);
        self.args(args);
    }

    fn args(&mut self, args: &'n [CallArg<'a>]) {
        for a in args {
            match a {
                CallArg::Pos(e)
                | CallArg::Kwarg(_, e)
                | CallArg::PosSplat(e)
                | CallArg::KwargSplat(e) => self.expr(e),
            }
        }
    }

    fn expr(&mut self, e: &'n Expr<'a>) {
        match e {
            Expr::Var(_) | Expr::Const(_) => {}
            Expr::Slice(s) => {
                self.expr(&s.expr);
                for x in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.expr(x);
                }
            }
            Expr::UnaryOp(u) => self.expr(&u.expr),
            Expr::BinOp(b) => {
                self.expr(&b.left);
                self.expr(&b.right);
            }
            Expr::Compare(c) => {
                self.expr(&c.expr);
                for op in &c.ops {
                    self.expr(&op.expr);
                }
            }
            Expr::IfExpr(i) => {
                self.expr(&i.test_expr);
                self.expr(&i.true_expr);
                if let Some(f) = &i.false_expr {
                    self.expr(f);
                }
            }
            Expr::Filter(f) => {
                if let Some(x) = &f.expr {
                    self.expr(x);
                }
                self.args(&f.args);
            }
            Expr::Test(t) => {
                self.expr(&t.expr);
                self.args(&t.args);
            }
            Expr::GetAttr(g) => self.expr(&g.expr),
            Expr::GetItem(g) => {
                self.expr(&g.expr);
                self.expr(&g.subscript_expr);
            }
            Expr::Call(c) => self.call(&c.expr, &c.args),
            Expr::List(l) => l.items.iter().for_each(|x| self.expr(x)),
            Expr::Tuple(t) => t.items.iter().for_each(|x| self.expr(x)),
            Expr::Map(m) => m.keys.iter().chain(&m.values).for_each(|x| self.expr(x)),
        }
    }

    /// Whether a loop iterates over message content (None: a tuple target
    /// where vLLM's walk fails, so it takes its default).
    fn loops_over_content(&self) -> Option<bool> {
        // Names bound to `messages`, transitively through `set`.
        let mut names = vec!["messages"];
        let mut i = 0;
        while let Some(&name) = names.get(i) {
            i += 1;
            for (target, value) in &self.sets {
                if accesses(value, name, None) {
                    let target = var(target)?;
                    if target != name {
                        names.push(target);
                    }
                }
            }
        }
        // Loop variables over those: the messages.
        let mut messages = Vec::new();
        for l in &self.loops {
            if names.iter().any(|n| accesses(l.iter, n, None)) {
                messages.push(var(l.target)?);
            }
        }
        let is_content = |e: &Expr<'_>| messages.iter().any(|m| accesses(e, m, Some("content")));
        // Macro parameters some call passes message content to.
        let content_params: Vec<Vec<&str>> = self
            .macros
            .iter()
            .map(|m| {
                let mut params = Vec::new();
                for (callee, args) in &self.calls {
                    if var(callee) != Some(m.name) {
                        continue;
                    }
                    let positional = args.iter().filter_map(|a| match a {
                        CallArg::Pos(e) => Some(e),
                        _ => None,
                    });
                    for (param, e) in m.params.iter().zip(positional) {
                        if is_content(e) {
                            params.push(*param);
                        }
                    }
                    for a in args.iter() {
                        if let CallArg::Kwarg(k, e) = a {
                            if m.params.contains(k) && is_content(e) {
                                params.push(*k);
                            }
                        }
                    }
                }
                params
            })
            .collect();
        for l in &self.loops {
            let hit = is_content(l.iter)
                || match (l.in_macro, var(l.iter)) {
                    (Some(m), Some(name)) => {
                        content_params.get(m).is_some_and(|p| p.contains(&name))
                    }
                    (None, Some(name)) => name == "content",
                    _ => false,
                };
            if hit {
                var(l.target)?;
                return Some(true);
            }
        }
        Some(false)
    }
}
