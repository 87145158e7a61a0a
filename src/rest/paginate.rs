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
/// external URL, the request's path and its query (less the token and paging keys).
pub fn headers(external_url: &str, uri: &Uri, page: PageRequest, total: i64) -> HeaderMap {
    let per_page = page.per_page.max(1);
    let total_pages = ((total + per_page - 1) / per_page).max(1);
    let next = (page.page < total_pages).then(|| page.page + 1);
    let prev = (page.page > 1).then(|| (page.page - 1).min(total_pages));

    let kept: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| !matches!(k.as_ref(), "page" | "per_page" | "private_token"))
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let link_to = |target: i64| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (key, value) in &kept {
            query.append_pair(key, value);
        }
        query.append_pair("page", &target.to_string());
        query.append_pair("per_page", &per_page.to_string());
        format!("{external_url}{}?{}", uri.path(), query.finish())
    };
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
        let uri: Uri = "/api/v4/projects/root%2Ftest/cluster_agents?page=2&per_page=2&x=a,b"
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
            "<https://gw.example/api/v4/projects/root%2Ftest/cluster_agents?x=a%2Cb&page=1&per_page=2>; rel=\"prev\", \
             <https://gw.example/api/v4/projects/root%2Ftest/cluster_agents?x=a%2Cb&page=3&per_page=2>; rel=\"next\", \
             <https://gw.example/api/v4/projects/root%2Ftest/cluster_agents?x=a%2Cb&page=1&per_page=2>; rel=\"first\", \
             <https://gw.example/api/v4/projects/root%2Ftest/cluster_agents?x=a%2Cb&page=3&per_page=2>; rel=\"last\""
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
