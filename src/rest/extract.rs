//! Request extractors: the caller, merged parameters (query and body, JSON or form), path
//! arguments. Rejections are domain errors, so they render as GitLab does.

use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use http::request::Parts;
use http::{Method, header};
use serde_json::{Map, Value};
use time::Date;

use super::App;
use crate::domain::{
    Caller, Error, Id, Intent, PageRequest, ParamProblem, ProjectRef, Result, parse_date,
};

/// The personal access token of a request: `Private-Token`, `Authorization: Bearer` or
/// `?private_token=`, in that order.
fn request_token(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get("private-token") {
        return value.to_str().ok().map(str::to_owned);
    }
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    let query = parts.uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "private_token")
        .map(|(_, value)| value.into_owned())
}

/// Who the request asks to act as: `?sudo=`, else the `Sudo` header (GitLab's order).
fn request_sudo(parts: &Parts) -> Result<Option<String>> {
    if let Some(query) = parts.uri.query()
        && let Some((_, value)) =
            form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "sudo")
    {
        return Ok(Some(value.into_owned()));
    }
    match parts.headers.get("sudo") {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim().to_owned()))
            .map_err(|_| Error::MalformedString),
    }
}

impl FromRequestParts<App> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self> {
        let intent = if parts.method == Method::GET || parts.method == Method::HEAD {
            Intent::Read
        } else {
            Intent::Write
        };
        let sudo = request_sudo(parts)?;
        app.service
            .authenticate(request_token(parts).as_deref(), intent, sudo.as_deref())
            .await
    }
}

/// Path arguments, percent-decoded, by name.
#[derive(Debug)]
pub struct PathArgs(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for PathArgs {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        let args = match Path::<Vec<(String, String)>>::from_request_parts(parts, state).await {
            Ok(Path(args)) => args,
            // `finish` refuses such paths first; this keeps the reply the same where a router
            // is used without it.
            Err(PathRejection::FailedToDeserializePathParams(e))
                if matches!(e.kind(), ErrorKind::InvalidUtf8InPathParam { .. }) =>
            {
                return Err(Error::MalformedString);
            }
            Err(_) => return Err(Error::NotFound(crate::domain::Missing::Resource)),
        };
        if args.iter().any(|(_, value)| value.contains('\0')) {
            return Err(Error::MalformedString);
        }
        Ok(Self(args))
    }
}

impl PathArgs {
    fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map_or("", |(_, value)| value.as_str())
    }

    /// The project named by `:id`.
    pub fn project(&self) -> ProjectRef {
        ProjectRef::parse(self.get("id"))
    }

    /// An integer argument, or `<name> is invalid`.
    pub fn id(&self, name: &str) -> Result<Id> {
        self.get(name)
            .parse::<Id>()
            .map_err(|_| Error::param(ParamProblem::Invalid(name.to_owned())))
    }
}

/// All parameters of a request: the query string merged with the body (which wins), as
/// Rack merges them. Bodies may be JSON or form-encoded; `key[]=` builds arrays.
#[derive(Debug, Default)]
pub struct Params(Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        let mut params = Map::new();
        if let Some(query) = req.uri().query() {
            merge_form(&mut params, query.as_bytes())?;
        }
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
                Error::PayloadTooLarge
            } else if crate::listener::is_body_timeout(&rejection) {
                Error::RequestTimeout
            } else {
                Error::BadRequest("could not read the request body".into())
            }
        })?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(params));
        }
        match content_type.as_deref() {
            Some("application/json") => {
                // Invalid UTF-8 is a malformed string, as for every other input, not bad JSON.
                let text = std::str::from_utf8(&body).map_err(|_| Error::MalformedString)?;
                match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(object)) => {
                        if object_holds_nul(&object) {
                            return Err(Error::MalformedString);
                        }
                        refuse_sudo_in_body(object.contains_key("sudo"))?;
                        params.extend(object);
                    }
                    // `null`, `[]`, `42` (the Go client sends `null` for nil options): valid
                    // JSON that names no parameter. GitLab ignores it and answers from the
                    // query string.
                    Ok(other) => {
                        if holds_nul(&other) {
                            return Err(Error::MalformedString);
                        }
                    }
                    Err(_) => return Err(Error::MalformedJson),
                }
            }
            None | Some("application/x-www-form-urlencoded") => {
                refuse_sudo_in_body(form_pairs(&body)?.iter().any(|(k, _)| k == "sudo"))?;
                merge_form(&mut params, &body)?;
            }
            Some(_) => return Err(Error::UnsupportedMediaType),
        }
        Ok(Self(params))
    }
}

/// The caller was authenticated from the request head, before the body was read: a `sudo`
/// in the body comes too late to decide who is calling, and acting as the token's owner
/// instead would be wrong, so it is refused.
fn refuse_sudo_in_body(present: bool) -> Result<()> {
    if present {
        return Err(Error::BadRequest(
            "sudo must be given in the Sudo header or the query string, not in the body".into(),
        ));
    }
    Ok(())
}

/// Whether a JSON value holds a NUL character in a string or a key, at any depth (serde_json
/// bounds the depth when parsing).
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => object_holds_nul(map),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

fn object_holds_nul(map: &Map<String, Value>) -> bool {
    map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v))
}

/// One percent-decoded component of a form or query (`+` is a space), refused when its bytes
/// are not UTF-8 or hold a NUL. The bytes are checked before any conversion, which would
/// otherwise replace invalid sequences and hide them.
fn decode_form_component(raw: &[u8]) -> Result<String> {
    let spaced: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    let bytes: Vec<u8> = percent_encoding::percent_decode(&spaced).collect();
    match String::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => Ok(text),
        _ => Err(Error::MalformedString),
    }
}

/// The `key=value` pairs of a form body or a query string, decoded and checked.
pub(crate) fn form_pairs(input: &[u8]) -> Result<Vec<(String, String)>> {
    input
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = match pair.iter().position(|&b| b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &[][..]),
            };
            Ok((decode_form_component(key)?, decode_form_component(value)?))
        })
        .collect()
}

/// Whether a request path holds, once percent-decoded, invalid UTF-8 or a NUL.
pub(crate) fn malformed_path(path: &str) -> bool {
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    std::str::from_utf8(&bytes).map_or(true, |text| text.contains('\0'))
}

fn merge_form(params: &mut Map<String, Value>, input: &[u8]) -> Result<()> {
    for (key, value) in form_pairs(input)? {
        let value = Value::String(value);
        if let Some(key) = key.strip_suffix("[]") {
            match params.get_mut(key) {
                Some(Value::Array(items)) => items.push(value),
                _ => {
                    params.insert(key.to_owned(), Value::Array(vec![value]));
                }
            }
        } else {
            params.insert(key, value);
        }
    }
    Ok(())
}

impl Params {
    /// Parameters from a map (for tests and internal callers).
    pub fn from_map(map: Map<String, Value>) -> Self {
        Self(map)
    }

    /// Starts reading parameters, collecting every problem before failing.
    pub fn check(&self) -> Check<'_> {
        Check {
            params: &self.0,
            problems: Vec::new(),
        }
    }
}

/// Reads typed parameters as Grape coerces them; problems are collected and reported
/// together by [`Check::finish`]. Values returned alongside a problem are placeholders.
#[derive(Debug)]
pub struct Check<'a> {
    params: &'a Map<String, Value>,
    problems: Vec<ParamProblem>,
}

impl Check<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.params.get(key).filter(|v| !v.is_null())
    }

    fn problem(&mut self, problem: ParamProblem) {
        self.problems.push(problem);
    }

    /// A string parameter, if given.
    pub fn optional_string(&mut self, key: &str) -> Option<String> {
        match self.present(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.problem(ParamProblem::Invalid(key.to_owned()));
                None
            }
        }
    }

    /// A required string parameter.
    pub fn required_string(&mut self, key: &str) -> String {
        if self.present(key).is_none() {
            self.problem(ParamProblem::Missing(key.to_owned()));
            return String::new();
        }
        self.optional_string(key).unwrap_or_default()
    }

    /// An integer parameter, if given.
    pub fn optional_int(&mut self, key: &str) -> Option<i64> {
        let parsed = match self.present(key)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        if parsed.is_none() {
            self.problem(ParamProblem::Invalid(key.to_owned()));
        }
        parsed
    }

    /// A required integer parameter.
    pub fn required_int(&mut self, key: &str) -> i64 {
        if self.present(key).is_none() {
            self.problem(ParamProblem::Missing(key.to_owned()));
            return 0;
        }
        self.optional_int(key).unwrap_or_default()
    }

    /// A required integer that must map to one of a set of values.
    pub fn required_choice<T>(
        &mut self,
        key: &str,
        choose: impl Fn(i64) -> Option<T>,
    ) -> Option<T> {
        if self.present(key).is_none() {
            self.problem(ParamProblem::Missing(key.to_owned()));
            return None;
        }
        let chosen = choose(self.optional_int(key)?);
        if chosen.is_none() {
            self.not_allowed(key);
        }
        chosen
    }

    /// A boolean parameter, if given (`true`/`false`, `1`/`0`).
    pub fn optional_bool(&mut self, key: &str) -> Option<bool> {
        let parsed = match self.present(key)? {
            Value::Bool(b) => Some(*b),
            Value::Number(n) => match n.as_i64() {
                Some(1) => Some(true),
                Some(0) => Some(false),
                _ => None,
            },
            // Grape's coercion (dry-types `Params::Bool`): Python clients send `True`.
            Value::String(s) => match s.as_str() {
                "1" | "on" | "On" | "ON" | "t" | "true" | "True" | "TRUE" | "T" | "y" | "yes"
                | "Yes" | "YES" | "Y" => Some(true),
                "0" | "off" | "Off" | "OFF" | "f" | "false" | "False" | "FALSE" | "F" | "n"
                | "no" | "No" | "NO" | "N" => Some(false),
                _ => None,
            },
            _ => None,
        };
        if parsed.is_none() {
            self.problem(ParamProblem::Invalid(key.to_owned()));
        }
        parsed
    }

    /// A required array of strings (a single string counts as one item).
    pub fn required_strings(&mut self, key: &str) -> Vec<String> {
        match self.present(key) {
            None => {
                self.problem(ParamProblem::Missing(key.to_owned()));
                Vec::new()
            }
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                let strings: Option<Vec<String>> = items
                    .iter()
                    .map(|item| item.as_str().map(str::to_owned))
                    .collect();
                strings.unwrap_or_else(|| {
                    self.problem(ParamProblem::Invalid(key.to_owned()));
                    Vec::new()
                })
            }
            Some(_) => {
                self.problem(ParamProblem::Invalid(key.to_owned()));
                Vec::new()
            }
        }
    }

    /// A `YYYY-MM-DD` date, if given.
    pub fn optional_date(&mut self, key: &str) -> Option<Date> {
        let text = self.optional_string(key)?;
        let date = parse_date(&text);
        if date.is_none() {
            self.problem(ParamProblem::Invalid(key.to_owned()));
        }
        date
    }

    /// Records that `key` is outside its allowed values.
    pub fn not_allowed(&mut self, key: &str) {
        self.problem(ParamProblem::NotAllowed(key.to_owned()));
    }

    /// `page` and `per_page`, with GitLab's defaults, cap and messages.
    pub fn page(&mut self) -> PageRequest {
        let mut request = PageRequest::default();
        if let Some(page) = self.optional_int("page") {
            if page < 1 {
                self.not_allowed("page");
            } else {
                request.page = page;
            }
        }
        if let Some(per_page) = self.optional_int("per_page") {
            if per_page < 1 {
                self.not_allowed("per_page");
            } else {
                request.per_page = per_page.min(PageRequest::MAX_PER_PAGE);
            }
        }
        request
    }

    /// Fails with every problem seen, or succeeds.
    pub fn finish(self) -> Result<()> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Params(self.problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::respond::Respond;
    use serde_json::json;

    fn params(value: Value) -> Params {
        match value {
            Value::Object(map) => Params::from_map(map),
            _ => Params::default(),
        }
    }

    #[test]
    fn missing_and_invalid_are_collected() {
        let p = params(json!({"description": ["x"]}));
        let mut check = p.check();
        let _ = check.required_string("name");
        let _ = check.optional_string("description");
        let err = check.finish().err().map(|e| e.reply().body);
        assert_eq!(
            err,
            Some(json!({"error": "name is missing, description is invalid"}))
        );
    }

    #[test]
    fn numbers_coerce_to_strings() {
        let p = params(json!({"name": 12}));
        let mut check = p.check();
        assert_eq!(check.required_string("name"), "12");
        assert!(check.finish().is_ok());
    }

    #[test]
    fn booleans_coerce_as_grape_does() {
        for (value, expected) in [
            (json!("True"), Some(true)),
            (json!("yes"), Some(true)),
            (json!(1), Some(true)),
            (json!(false), Some(false)),
            (json!("F"), Some(false)),
            (json!("0"), Some(false)),
        ] {
            let p = params(json!({ "flag": value }));
            let mut check = p.check();
            assert_eq!(check.optional_bool("flag"), expected, "{value}");
            assert!(check.finish().is_ok());
        }
        let p = params(json!({"flag": "maybe"}));
        let mut check = p.check();
        assert_eq!(check.optional_bool("flag"), None);
        assert!(check.finish().is_err());
    }

    #[test]
    fn paging_rules() {
        let p = params(json!({"page": "2", "per_page": "1000"}));
        let mut check = p.check();
        assert_eq!(
            check.page(),
            PageRequest {
                page: 2,
                per_page: 100
            }
        );
        assert!(check.finish().is_ok());

        let p = params(json!({"per_page": 0}));
        let mut check = p.check();
        let _ = check.page();
        let err = check.finish().err().map(|e| e.reply().body);
        assert_eq!(
            err,
            Some(json!({"error": "per_page does not have a valid value"}))
        );

        let p = params(json!({"page": "x"}));
        let mut check = p.check();
        let _ = check.page();
        let err = check.finish().err().map(|e| e.reply().body);
        assert_eq!(err, Some(json!({"error": "page is invalid"})));
    }

    #[test]
    fn form_arrays() {
        let mut map = Map::new();
        merge_form(&mut map, b"scopes[]=api&scopes[]=read_api&name=a%2Cb+c").unwrap();
        assert_eq!(
            Value::Object(map),
            json!({"scopes": ["api", "read_api"], "name": "a,b c"})
        );
    }

    #[test]
    fn form_components_with_nul_or_invalid_utf8_are_refused() {
        for input in [
            &b"name=a%00b"[..],
            b"na%00me=x",
            b"name=%FF",
            b"name=%C3",
            b"%E2%82=x",
            b"name=\xff",
            b"a=1&b[]=ok&b[]=%00",
        ] {
            assert_eq!(
                form_pairs(input).err(),
                Some(Error::MalformedString),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            form_pairs(b"name=%C3%A9t%C3%A9&empty=&flag").ok(),
            Some(vec![
                ("name".into(), "\u{e9}t\u{e9}".into()),
                ("empty".into(), String::new()),
                ("flag".into(), String::new()),
            ])
        );
    }

    #[test]
    fn paths_with_nul_or_invalid_utf8_are_malformed() {
        assert!(malformed_path("/api/v4/projects/root%00%2Ftest"));
        assert!(malformed_path("/api/v4/projects/%FF/cluster_agents"));
        assert!(malformed_path("/api/v4/users/%C0%80"));
        assert!(!malformed_path("/api/v4/projects/root%2Fcaf%C3%A9"));
        assert!(!malformed_path("/api/v4/projects/100%"));
    }

    #[test]
    fn nul_is_found_at_any_depth_of_json() {
        assert!(holds_nul(&json!({"a": [{"b": ["x\u{0}"]}]})));
        assert!(holds_nul(&json!([{"k\u{0}": 1}])));
        assert!(!holds_nul(&json!({"a": ["\u{1}", 0, null, true]})));
    }
}
