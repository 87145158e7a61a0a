//! GitLab's offset pagination headers: `X-Total`, `X-Page`, …, and `Link`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use serde::Serialize;

use crate::domain::PageRequest;

/// A page of JSON items with its pagination headers.
pub fn paged<T: Serialize>(
    external_url: &str,
    uri: &Uri,
    page: PageRequest,
    total: i64,
    items: Vec<T>,
) -> Response {
    (headers(external_url, uri, page, total), Json(items)).into_response()
}

/// The pagination headers for `page` of `total` items, with `Link` URLs built from the
/// external URL, the request's path and `page`/`per_page`.
///
/// GitLab copies the whole query into `Link`; here no list takes a filter, so nothing else is
/// kept: a copied query is unbounded (a 40 KB query made an 80 KB header that clients
/// refuse) and may carry a token. Numeric path segments are written without leading zeros,
/// so a padded id cannot grow the header either.
pub fn headers(external_url: &str, uri: &Uri, page: PageRequest, total: i64) -> HeaderMap {
    let per_page = page.per_page.max(1);
    let total_pages = ((total + per_page - 1) / per_page).max(1);
    let next = (page.page < total_pages).then(|| page.page + 1);
    let prev = (page.page > 1).then(|| (page.page - 1).min(total_pages));

    let path = canonical_path(uri.path());
    let link_to = |target: i64| format!("{external_url}{path}?page={target}&per_page={per_page}");
    let mut links = Vec::new();
    if let Some(prev) = prev {
        links.push(format!("<{}>; rel=\"prev\"", link_to(prev)));
    }
    if let Some(next) = next {
        links.push(format!("<{}>; rel=\"next\"", link_to(next)));
    }
    links.push(format!("<{}>; rel=\"first\"", link_to(1)));
    links.push(format!("<{}>; rel=\"last\"", link_to(total_pages)));

    let mut map = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            map.insert(HeaderName::from_static(name), value);
        }
    };
    let or_empty = |n: Option<i64>| n.map(|n| n.to_string()).unwrap_or_default();
    put("x-total", total.to_string());
    put("x-total-pages", total_pages.to_string());
    put("x-per-page", per_page.to_string());
    put("x-page", page.page.to_string());
    put("x-next-page", or_empty(next));
    put("x-prev-page", or_empty(prev));
    put("link", links.join(", "));
    map
}

/// `path` with every segment that decodes to digits written as its plain number (`%30%37`,
/// `007` and `+7` are `7`, as the handlers read them); other segments stay as sent: they are
/// route literals or paths of existing projects, which are bounded.
fn canonical_path(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
            let digits = decoded.strip_prefix('+').unwrap_or(&decoded);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                let number = digits.trim_start_matches('0');
                if number.is_empty() { "0" } else { number }.to_owned()
            } else {
                segment.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(map: &HeaderMap, name: &str) -> String {
        map.get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("<none>")
            .to_owned()
    }

    #[test]
    fn middle_page() {
        let uri: Uri =
            "/api/v4/projects/root%2Ftest/cluster_agents?page=2&per_page=2&x=a,b&private_token=t"
                .parse()
                .unwrap_or_default();
        let map = headers(
            "https://gw.example",
            &uri,
            PageRequest {
                page: 2,
                per_page: 2,
            },
            5,
        );
        assert_eq!(header(&map, "x-total"), "5");
        assert_eq!(header(&map, "x-total-pages"), "3");
        assert_eq!(header(&map, "x-next-page"), "3");
        assert_eq!(header(&map, "x-prev-page"), "1");
        let link = header(&map, "link");
        assert_eq!(
            link,
            "<https://gw.example/api/v4/projects/root%2Ftest/cluster_agents?page=1&per_page=2>; rel=\"prev\", \
             <https://gw.example/api/v4/projects/root%2Ftest/cluster_agents?page=3&per_page=2>; rel=\"next\", \
             <https://gw.example/api/v4/projects/root%2Ftest/cluster_agents?page=1&per_page=2>; rel=\"first\", \
             <https://gw.example/api/v4/projects/root%2Ftest/cluster_agents?page=3&per_page=2>; rel=\"last\""
        );
    }

    #[test]
    fn padded_numeric_segments_are_written_plainly() {
        assert_eq!(
            canonical_path("/api/v4/projects/0007/cluster_agents/%2B%30%31/tokens"),
            "/api/v4/projects/7/cluster_agents/1/tokens"
        );
        assert_eq!(canonical_path("/api/v4/projects/000"), "/api/v4/projects/0");
        assert_eq!(
            canonical_path("/api/v4/projects/root%2F007"),
            "/api/v4/projects/root%2F007"
        );
    }

    #[test]
    fn empty_list_has_one_page() {
        let uri: Uri = "/x".parse().unwrap_or_default();
        let map = headers("http://h", &uri, PageRequest::default(), 0);
        assert_eq!(header(&map, "x-total-pages"), "1");
        assert_eq!(header(&map, "x-next-page"), "");
        assert_eq!(header(&map, "x-prev-page"), "");
        assert!(!header(&map, "link").contains("rel=\"next\""));
    }
}
