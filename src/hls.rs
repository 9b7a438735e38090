//! HLS playlist rewriting: every URI a player would follow is pointed back
//! through the proxy, so segments, keys and renditions never bypass it; and
//! the facts about a playlist that its rewritten children depend on (how
//! long they must stay valid, what their names must end in).

use std::borrow::Cow;
use std::collections::HashMap;

use url::Url;

/// What a playlist is, from one pass over its tags.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    /// A master (multivariant) playlist: its URI lines are variant playlists.
    pub master: bool,
    /// A media playlist that ends (`#EXT-X-ENDLIST`): video on demand.
    pub ended: bool,
    /// The sum of its `#EXTINF` durations, in seconds.
    pub duration: f64,
    /// Its segments are fragmented MP4 (`#EXT-X-MAP`).
    pub fmp4: bool,
    /// `#EXT-X-TARGETDURATION`, in seconds (a live playlist is reloaded this often).
    pub target_duration: Option<f64>,
}

impl Summary {
    pub fn of(playlist: &str) -> Summary {
        let mut s = Summary::default();
        let (mut variants, mut segments) = (false, false);
        for line in playlist.lines() {
            let Some(tag) = line.trim().strip_prefix("#EXT") else { continue };
            if let Some(inf) = tag.strip_prefix("INF:") {
                segments = true;
                let secs = inf.split(',').next().unwrap_or("").trim().parse::<f64>().unwrap_or(0.0);
                if secs.is_finite() && secs > 0.0 {
                    s.duration += secs;
                }
            } else if tag.starts_with("-X-STREAM-INF:") || tag.starts_with("-X-I-FRAME-STREAM-INF:") {
                variants = true;
            } else if tag.starts_with("-X-ENDLIST") {
                s.ended = true;
            } else if tag.starts_with("-X-MAP:") {
                s.fmp4 = true;
            } else if let Some(target) = tag.strip_prefix("-X-TARGETDURATION:") {
                s.target_duration = target.trim().parse::<f64>().ok().filter(|t| t.is_finite() && *t > 0.0);
            }
        }
        s.master = variants && !segments;
        s
    }
}

/// The longest playback a VOD playlist's duration may extend its children's
/// validity by: a playlist claiming more counts as this long.
pub const MAX_PLAYBACK: u64 = 24 * 3600;

/// How long, from now, the signed children of a playlist must stay valid
/// (seconds): a master's for the whole session (players switch variants
/// late), a VOD media playlist's for the playback plus `token_ttl` (players
/// load it once and fetch its last segment at the end), a live one's for
/// `token_ttl` (players reload it every target duration).
pub fn child_lifetime(s: &Summary, token_ttl: u64, session_ttl: u64) -> u64 {
    if s.master {
        session_ttl
    } else if s.ended {
        token_ttl.saturating_add((s.duration.ceil() as u64).min(MAX_PLAYBACK))
    } else {
        token_ttl
    }
}

/// Segment file extensions HLS players accept: ffmpeg's default
/// `allowed_segment_extensions` (ffmpeg ≥ 5.1 refuses others unless told
/// `-extension_picky 0`, which Jellyfin does not), without `html`; the
/// common ones first (this is checked for every segment of a playlist).
const SEGMENT_EXTENSIONS: [&str; 30] = [
    "ts", "m4s", "mp4", "aac", "vtt", "webvtt", "m4a", "m4v", "mp3", "ac3", "eac3", "ec3", "mpegts", "cmfv", "cmfa",
    "fmp4", "3gp", "avi", "flac", "mkv", "m3u8", "mpg", "mov", "mp2", "mpeg", "ogg", "ogv", "oga", "vob", "wav",
];

/// Appends the cosmetic file name for a child URL to `out`: its last path
/// segment, and for a segment whose name has no media extension (hosters
/// disguise segments as `.jpg`, `.png`, `.html`) `.ts` after it — `.m4s`
/// when the playlist's segments are fMP4 — so players accept it. Only the
/// name changes; the bytes are relayed untouched.
pub fn push_hint(child: &str, segment: bool, fmp4: bool, out: &mut String) {
    let hint = hint_for(child);
    out.push_str(hint);
    if segment && disguised(hint) {
        out.push_str(if fmp4 { ".m4s" } else { ".ts" });
    }
}

/// Whether a segment's file name (`hint`) lacks an extension players accept
/// for segments (a hoster's `.jpg`, `.png`, `.html`, or none).
pub fn disguised(hint: &str) -> bool {
    let ext = crate::content_type::extension(hint).unwrap_or("");
    !SEGMENT_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext))
}

/// Whether a body is an HLS playlist (`#EXTM3U`, optionally after a BOM).
pub fn looks_like_playlist(body: &[u8]) -> bool {
    let b = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    b.starts_with(b"#EXTM3U")
}

/// The cosmetic file name for a child URL: its last path segment, so
/// `seg001.ts` keeps its extension.
pub fn hint_for(url: &str) -> &str {
    let b = url.as_bytes();
    // Skip "scheme://authority"; the path runs to '?' or '#'.
    let after_scheme = if b.starts_with(b"https://") {
        8
    } else if b.starts_with(b"http://") {
        7
    } else {
        url.find("://").map(|i| i + 3).unwrap_or(0)
    };
    let mut path_start = None;
    let mut last_slash = None;
    let mut end = b.len();
    for (i, &c) in b.iter().enumerate().skip(after_scheme) {
        match c {
            b'/' => {
                path_start.get_or_insert(i);
                last_slash = Some(i);
            }
            b'?' | b'#' => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let seg = match (path_start, last_slash) {
        (Some(_), Some(l)) => &url[l + 1..end],
        _ => "",
    };
    if seg.is_empty() || seg == "." || seg == ".." {
        "stream"
    } else {
        seg
    }
}

/// The playlist URL's pieces that relative references resolve against.
struct Base<'a> {
    url: &'a Url,
    /// http or https: only then is the concatenation shortcut exact.
    special: bool,
    /// `scheme://authority`
    origin: &'a str,
    /// Everything up to and including the last `/` of the path.
    dir: &'a str,
}

impl<'a> Base<'a> {
    fn new(url: &'a Url) -> Base<'a> {
        let s = url.as_str();
        let origin = &s[..url[..url::Position::BeforePath].len()];
        let path_end = url[..url::Position::AfterPath].len();
        let dir = &s[..s[..path_end].rfind('/').map(|i| i + 1).unwrap_or(path_end)];
        Base { url, special: matches!(url.scheme(), "http" | "https"), origin, dir }
    }

    /// The absolute http(s) URL a player would fetch for `uri`, or `None`
    /// for other schemes (`skd://`, `data:`) and unparsable references.
    fn resolve<'u>(&self, uri: &'u str) -> Option<Cow<'u, str>> {
        if let Some(fast) = self.resolve_plain(uri) {
            return Some(fast);
        }
        let u = self.url.join(uri).ok()?;
        matches!(u.scheme(), "http" | "https").then(|| Cow::Owned(u.into()))
    }

    /// The common shapes, resolved by concatenation exactly as `Url::join`
    /// would: a relative path, a root-relative path, or an already
    /// canonical absolute http(s) URL — made only of characters the URL
    /// parser leaves alone and without dot segments. `None`: not plain.
    fn resolve_plain<'u>(&self, uri: &'u str) -> Option<Cow<'u, str>> {
        if !self.special || !is_plain(uri) {
            return None;
        }
        if let Some(rest) = uri.strip_prefix("http://").or_else(|| uri.strip_prefix("https://")) {
            // Host: lower-case name, no port, userinfo or IP literal forms;
            // a path must follow.
            let slash = rest.find('/')?;
            let host = &rest[..slash];
            let plain_host = !host.is_empty()
                && host.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && !host.starts_with('.')
                && !host.ends_with('.')
                && !host.contains("..")
                && !host.split('.').any(|l| l.starts_with("xn--") || l.is_empty())
                // WHATWG parses a host whose last label is a number as IPv4
                // (and refuses `a.0`): not plain.
                && !host.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()) || l.starts_with("0x"));
            return plain_host.then_some(Cow::Borrowed(uri));
        }
        let first = uri.as_bytes()[0];
        let mut out = String::with_capacity(self.dir.len() + uri.len());
        if first == b'/' {
            if uri.starts_with("//") {
                return None;
            }
            out.push_str(self.origin);
        } else {
            // A scheme ("name:") before any '/' or '?' makes it absolute.
            let delim = uri.find(['/', '?']).unwrap_or(uri.len());
            if first == b'?' || uri[..delim].contains(':') {
                return None;
            }
            out.push_str(self.dir);
        }
        out.push_str(uri);
        Some(Cow::Owned(out))
    }
}

/// Non-empty, only bytes the URL parser copies unchanged, and no `.`/`..`
/// segment (also percent-encoded) in the path — one pass.
fn is_plain(uri: &str) -> bool {
    let b = uri.as_bytes();
    if b.is_empty() {
        return false;
    }
    let mut in_path = true;
    let mut seg_start = 0;
    for (i, &c) in b.iter().enumerate() {
        if !PLAIN[c as usize] {
            return false;
        }
        if !in_path {
            continue;
        }
        match c {
            b'/' | b'?' => {
                if is_dot_segment(&b[seg_start..i]) {
                    return false;
                }
                seg_start = i + 1;
                in_path = c == b'/';
            }
            b'%' if i + 2 < b.len() && b[i + 1] == b'2' && (b[i + 2] | 0x20) == b'e' => return false,
            _ => {}
        }
    }
    !(in_path && is_dot_segment(&b[seg_start..]))
}

fn is_dot_segment(seg: &[u8]) -> bool {
    seg == b"." || seg == b".."
}

/// Bytes the URL parser copies unchanged in paths and queries.
const PLAIN: [bool; 256] = crate::charclass::alnum_and(b"-._~!$&()*+,;=:@/?%");

/// Rewrites a playlist whole: [`Rewrite`] run to its end.
pub fn rewrite(playlist: &str, summary: &Summary, base: &Url, proxied: impl FnMut(&str, bool, &mut String)) -> String {
    // URI lines roughly double or triple (signed query); avoid regrowth.
    let mut out = String::with_capacity(playlist.len() * 3);
    let mut rewrite = Rewrite::new(playlist, summary, base, proxied);
    while rewrite.next_piece(&mut out, usize::MAX) {}
    out
}

/// A playlist being rewritten, a piece at a time, so that what a client is
/// sent never has to exist whole: a rewritten playlist can be many times
/// its upstream's size (each short URI becomes a signed URL).
///
/// `base` is the final upstream URL (after redirects); `proxied(child,
/// segment, out)` appends the URL the client should use for an absolute
/// child URL to the output (`segment`: the child is a media segment or
/// part, not a playlist, key or map). Lines keep their endings; comments,
/// tags without URIs, blank lines and URIs that are not http(s) after
/// resolution (`skd://`, `data:`) are left exactly as they were, except
/// `#EXT-X-SERVER-CONTROL` (see [`server_control`]), the tags [`left_out`]
/// names, which become blank lines, and `#EXT-X-DEFINE` (see
/// [`Variables`]). The output has as many lines as the input. Two rewrites
/// of one playlist with the same `proxied` write the same bytes.
pub struct Rewrite<'a, F> {
    /// The lines not rewritten yet.
    rest: &'a str,
    /// A byte-order mark still to be written.
    bom: bool,
    master: bool,
    base: Base<'a>,
    vars: Variables,
    proxied: F,
}

impl<'a, F: FnMut(&str, bool, &mut String)> Rewrite<'a, F> {
    pub fn new(playlist: &'a str, summary: &Summary, base: &'a Url, proxied: F) -> Self {
        // A byte-order mark is kept, and does not make `#EXTM3U` a URI line.
        let (rest, bom) = match playlist.strip_prefix('\u{feff}') {
            Some(rest) => (rest, true),
            None => (playlist, false),
        };
        Rewrite { rest, bom, master: summary.master, base: Base::new(base), vars: Variables::default(), proxied }
    }

    /// Appends whole rewritten lines to `out` until it holds at least
    /// `at_least` bytes or the playlist ends; `false` once it has ended.
    pub fn next_piece(&mut self, out: &mut String, at_least: usize) -> bool {
        if std::mem::take(&mut self.bom) {
            out.push('\u{feff}');
        }
        while out.len() < at_least {
            if self.rest.is_empty() {
                return false;
            }
            let end = self.rest.find('\n').map_or(self.rest.len(), |i| i + 1);
            let (line, rest) = self.rest.split_at(end);
            self.rest = rest;
            self.line(line, out);
        }
        !self.rest.is_empty()
    }

    fn line(&mut self, line: &str, out: &mut String) {
        let (content, ending) = split_ending(line);
        let trimmed = content.trim();
        if trimmed.is_empty() {
            out.push_str(line);
        } else if let Some(attrs) = trimmed.strip_prefix(DEFINE) {
            self.vars.define(attrs, self.base.url, line, out);
        } else if trimmed.starts_with('#') {
            // #EXTINF (every other line of a media playlist) never has URIs.
            if let Some(attrs) = trimmed.strip_prefix(SERVER_CONTROL) {
                if let Some(kept) = server_control(attrs) {
                    out.push_str(indent(content));
                    out.push_str(SERVER_CONTROL);
                    out.push_str(&kept);
                }
                out.push_str(ending);
            } else if left_out(trimmed) {
                out.push_str(ending);
            } else if trimmed.starts_with("#EXT") && !trimmed.starts_with("#EXTINF:") && content.contains("URI=\"") {
                let parts = trimmed.starts_with("#EXT-X-PART:") || trimmed.starts_with("#EXT-X-PRELOAD-HINT:");
                rewrite_uri_attributes(content, &self.base, &self.vars, parts, &mut self.proxied, out);
                out.push_str(ending);
            } else {
                out.push_str(line);
            }
        } else {
            match self.base.resolve(&self.vars.substitute(trimmed)) {
                Some(child) => {
                    // Keep surrounding whitespace; replace only the URI.
                    let indent = indent(content);
                    out.push_str(indent);
                    (self.proxied)(&child, !self.master, out);
                    out.push_str(&content[indent.len() + trimmed.len()..]);
                    out.push_str(ending);
                }
                None => out.push_str(line),
            }
        }
    }
}

const SERVER_CONTROL: &str = "#EXT-X-SERVER-CONTROL:";
const DEFINE: &str = "#EXT-X-DEFINE:";

/// The `#EXT-X-DEFINE` variables defined so far. A player substitutes
/// `{$name}` in URIs itself, but the rewritten URIs carry the upstream URL
/// percent-encoded inside the proxy's query, where no reference is left to
/// substitute: so the proxy substitutes the references in the URIs it
/// rewrites. `NAME`/`VALUE` definitions stay as they are (players still
/// substitute other attributes, and import from a master). A `QUERYPARAM`
/// definition names a query parameter of the playlist's own URL, which for
/// the player is now the proxy's: it becomes a `NAME`/`VALUE` definition of
/// the upstream URL's value. An `IMPORT` in a media playlist names a
/// variable of the master, which the proxy does not see: left as it is.
#[derive(Default)]
struct Variables(HashMap<String, String>);

impl Variables {
    /// Takes in one `#EXT-X-DEFINE` (its attribute list `attrs`; `line` as
    /// it came) and writes the line the client gets to `out`.
    fn define(&mut self, attrs: &str, url: &Url, line: &str, out: &mut String) {
        let quoted = |name: &str| {
            attribute_list(attrs).find_map(|a| {
                let (n, v) = attribute(a);
                (n == name).then(|| v.strip_prefix('"')?.strip_suffix('"'))?
            })
        };
        if let (Some(name), Some(value)) = (quoted("NAME"), quoted("VALUE")) {
            // A later definition of a name wins, as in a player.
            self.0.insert(name.to_owned(), value.to_owned());
            out.push_str(line);
            return;
        }
        let found = quoted("QUERYPARAM").and_then(|name| {
            let value = url.query_pairs().find(|(k, _)| k == name)?.1;
            // A quoted-string cannot hold these: the player would not read it.
            (!value.contains(['"', '\r', '\n'])).then(|| (name.to_owned(), value.into_owned()))
        });
        match found {
            Some((name, value)) => {
                out.push_str(indent(line));
                out.push_str(DEFINE);
                out.push_str(&format!("NAME=\"{name}\",VALUE=\"{value}\""));
                out.push_str(split_ending(line).1);
                self.0.insert(name, value);
            }
            None => out.push_str(line),
        }
    }

    /// `text` with every reference to a defined variable replaced by its
    /// value; other references are left as they are.
    ///
    /// A variable name is `[A-Za-z0-9_-]+` (RFC 8216bis §4.2), read once
    /// per reference: the playlist comes from the hoster, and a line of
    /// unclosed `{$` (or thousands of definitions) must cost time in
    /// proportion to its length, not to its square.
    fn substitute<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if self.0.is_empty() || !text.contains("{$") {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find("{$") {
            out.push_str(&rest[..at]);
            let after = &rest[at + 2..];
            let len = after.bytes().take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')).count();
            let (name, closed) = (&after[..len], after.as_bytes().get(len) == Some(&b'}'));
            match self.0.get(name).filter(|_| closed) {
                Some(value) => {
                    out.push_str(value);
                    rest = &after[len + 1..];
                }
                None => {
                    out.push_str("{$");
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        Cow::Owned(out)
    }
}

/// The attributes of `#EXT-X-SERVER-CONTROL` a rewritten playlist keeps:
/// all but the delivery directives. `CAN-BLOCK-RELOAD` and `CAN-SKIP-UNTIL`
/// (with `CAN-SKIP-DATERANGES`) invite LL-HLS players (hls.js, AVPlayer) to
/// append `_HLS_msn`, `_HLS_part` or `_HLS_skip` to the playlist's URL; a
/// signed URL with a parameter added no longer verifies (401 on every
/// reload), and the proxy does not pass the directives upstream anyway.
/// Without them players reload the playlist as any live one. `None` when
/// nothing is left: the tag becomes a blank line, which players ignore.
fn server_control(attrs: &str) -> Option<String> {
    const DIRECTIVES: [&str; 3] = ["CAN-BLOCK-RELOAD", "CAN-SKIP-UNTIL", "CAN-SKIP-DATERANGES"];
    let mut kept = String::with_capacity(attrs.len());
    for attr in attribute_list(attrs) {
        let (name, _) = attribute(attr);
        if !DIRECTIVES.iter().any(|d| d.eq_ignore_ascii_case(name)) {
            if !kept.is_empty() {
                kept.push(',');
            }
            kept.push_str(attr);
        }
    }
    (!kept.is_empty()).then_some(kept)
}

/// Tags a rewritten playlist leaves out, because they send the player to
/// the hoster with a URL the proxy cannot hand out signed: content
/// steering (`#EXT-X-CONTENT-STEERING`: its `SERVER-URI` serves JSON whose
/// pathway clones rewrite the proxy's own host, and players append
/// `_HLS_pathway` to it) and interstitials (`#EXT-X-DATERANGE` with
/// `X-ASSET-URI` or `X-ASSET-LIST`: players append `_HLS_primary_id` to the
/// asset's URL, and an asset list is JSON of more URLs). Pointed through
/// the proxy they would fail their signature; left as they are the player
/// fetches from the hoster itself, which then learns who watches. Without
/// them players take the first pathway and play the primary content.
fn left_out(tag: &str) -> bool {
    const ASSETS: [&str; 2] = ["X-ASSET-URI", "X-ASSET-LIST"];
    if tag.starts_with("#EXT-X-CONTENT-STEERING:") {
        return true;
    }
    let Some(attrs) = tag.strip_prefix("#EXT-X-DATERANGE:") else { return false };
    attribute_list(attrs).any(|attr| ASSETS.iter().any(|a| a.eq_ignore_ascii_case(attribute(attr).0)))
}

/// Splits an attribute list at the commas outside quoted strings.
fn attribute_list(attrs: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    attrs
        .split(move |c| {
            if c == '"' {
                quoted = !quoted;
            }
            c == ',' && !quoted
        })
        .filter(|a| !a.trim().is_empty())
}

/// One attribute's name and value (an attribute without `=` has an empty
/// value), both trimmed.
fn attribute(attr: &str) -> (&str, &str) {
    let (name, value) = attr.split_once('=').unwrap_or((attr, ""));
    (name.trim(), value.trim())
}

/// The whitespace a line starts with.
fn indent(line: &str) -> &str {
    &line[..line.len() - line.trim_start().len()]
}

fn split_ending(line: &str) -> (&str, &str) {
    if let Some(c) = line.strip_suffix("\r\n") {
        (c, "\r\n")
    } else if let Some(c) = line.strip_suffix('\n') {
        (c, "\n")
    } else {
        (line, "")
    }
}

/// Rewrites each `URI="..."` attribute of a tag line into `out`.
fn rewrite_uri_attributes(
    line: &str,
    base: &Base<'_>,
    vars: &Variables,
    segment: bool,
    proxied: &mut impl FnMut(&str, bool, &mut String),
    out: &mut String,
) {
    let mut rest = line;
    while let Some(pos) = rest.find("URI=\"") {
        let attr_start = pos == 0 || matches!(rest.as_bytes()[pos - 1], b':' | b',' | b' ');
        let value_start = pos + 5;
        let Some(len) = rest[value_start..].find('"') else { break };
        out.push_str(&rest[..value_start]);
        let value = &rest[value_start..value_start + len];
        match base.resolve(&vars.substitute(value)).filter(|_| attr_start) {
            Some(child) => proxied(&child, segment, out),
            None => out.push_str(value),
        }
        rest = &rest[value_start + len..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("https://cdn.example/hls/v1/index.m3u8?tok=abc").unwrap()
    }

    fn mark(u: &str, segment: bool, out: &mut String) {
        out.push_str("P[");
        push_hint(u, segment, false, out);
        out.push_str(&format!("|{u}]"));
    }

    #[test]
    fn master_playlist_with_renditions() {
        let src = "#EXTM3U\n\
#EXT-X-VERSION:6\n\
#EXT-X-SESSION-KEY:METHOD=AES-128,URI=\"/keys/session.key\"\n\
#EXT-X-SESSION-DATA:DATA-ID=\"com.example.title\",URI=\"meta.json\"\n\
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"aud\",NAME=\"Deutsch\",URI=\"audio/de.m3u8\"\n\
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID=\"sub\",NAME=\"English\",URI=\"https://subs.example/en.m3u8\"\n\
#EXT-X-MEDIA:TYPE=CLOSED-CAPTIONS,GROUP-ID=\"cc\",NAME=\"CC\",INSTREAM-ID=\"CC1\"\n\
#EXT-X-STREAM-INF:BANDWIDTH=1280000,RESOLUTION=1280x720,AUDIO=\"aud\"\n\
720p/index.m3u8\n\
#EXT-X-STREAM-INF:BANDWIDTH=2560000,RESOLUTION=1920x1080\n\
../1080p/index.m3u8?x=1\n\
#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=86000,URI=\"iframes.m3u8\"\n";
        let out = rewrite(src, &Summary::of(src), &base(), mark);
        let expect = "#EXTM3U\n\
#EXT-X-VERSION:6\n\
#EXT-X-SESSION-KEY:METHOD=AES-128,URI=\"P[session.key|https://cdn.example/keys/session.key]\"\n\
#EXT-X-SESSION-DATA:DATA-ID=\"com.example.title\",URI=\"P[meta.json|https://cdn.example/hls/v1/meta.json]\"\n\
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"aud\",NAME=\"Deutsch\",URI=\"P[de.m3u8|https://cdn.example/hls/v1/audio/de.m3u8]\"\n\
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID=\"sub\",NAME=\"English\",URI=\"P[en.m3u8|https://subs.example/en.m3u8]\"\n\
#EXT-X-MEDIA:TYPE=CLOSED-CAPTIONS,GROUP-ID=\"cc\",NAME=\"CC\",INSTREAM-ID=\"CC1\"\n\
#EXT-X-STREAM-INF:BANDWIDTH=1280000,RESOLUTION=1280x720,AUDIO=\"aud\"\n\
P[index.m3u8|https://cdn.example/hls/v1/720p/index.m3u8]\n\
#EXT-X-STREAM-INF:BANDWIDTH=2560000,RESOLUTION=1920x1080\n\
P[index.m3u8|https://cdn.example/hls/1080p/index.m3u8?x=1]\n\
#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=86000,URI=\"P[iframes.m3u8|https://cdn.example/hls/v1/iframes.m3u8]\"\n";
        assert_eq!(out, expect);
    }

    #[test]
    fn media_playlist_keys_maps_byteranges_crlf() {
        let src = "#EXTM3U\r\n#EXT-X-TARGETDURATION:4\r\n\
#EXT-X-KEY:METHOD=AES-128,URI=\"key.bin\",IV=0x0123\r\n\
#EXT-X-MAP:URI=\"init.mp4\",BYTERANGE=\"720@0\"\r\n\
# a comment with URI=\"nope\"\r\n\
\r\n\
#EXTINF:4.0,\r\n#EXT-X-BYTERANGE:1000@720\r\nmain.mp4\r\n\
#EXT-X-KEY:METHOD=SAMPLE-AES,URI=\"skd://key-id\",KEYFORMAT=\"com.apple.streamingkeydelivery\"\r\n\
#EXTINF:4.0,\r\nhttp://other.example/seg2.ts\r\n#EXT-X-ENDLIST";
        let out = rewrite(src, &Summary::of(src), &base(), mark);
        let expect = "#EXTM3U\r\n#EXT-X-TARGETDURATION:4\r\n\
#EXT-X-KEY:METHOD=AES-128,URI=\"P[key.bin|https://cdn.example/hls/v1/key.bin]\",IV=0x0123\r\n\
#EXT-X-MAP:URI=\"P[init.mp4|https://cdn.example/hls/v1/init.mp4]\",BYTERANGE=\"720@0\"\r\n\
# a comment with URI=\"nope\"\r\n\
\r\n\
#EXTINF:4.0,\r\n#EXT-X-BYTERANGE:1000@720\r\nP[main.mp4|https://cdn.example/hls/v1/main.mp4]\r\n\
#EXT-X-KEY:METHOD=SAMPLE-AES,URI=\"skd://key-id\",KEYFORMAT=\"com.apple.streamingkeydelivery\"\r\n\
#EXTINF:4.0,\r\nP[seg2.ts|http://other.example/seg2.ts]\r\n#EXT-X-ENDLIST";
        assert_eq!(out, expect);
        assert_eq!(out.lines().count(), src.lines().count());
    }

    #[test]
    fn ll_hls_tags() {
        let src = "#EXTM3U\n\
#EXT-X-PART:DURATION=0.33,URI=\"part1.m4s\",INDEPENDENT=YES\n\
#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part2.m4s\"\n\
#EXT-X-RENDITION-REPORT:URI=\"../low/index.m3u8\",LAST-MSN=10\n";
        let out = rewrite(src, &Summary::of(src), &base(), mark);
        assert!(out.contains("URI=\"P[part1.m4s|https://cdn.example/hls/v1/part1.m4s]\",INDEPENDENT=YES"));
        assert!(out.contains("PRELOAD-HINT:TYPE=PART,URI=\"P[part2.m4s|https://cdn.example/hls/v1/part2.m4s]\""));
        assert!(out.contains("URI=\"P[index.m3u8|https://cdn.example/hls/low/index.m3u8]\",LAST-MSN=10"));
    }

    #[test]
    fn server_control_loses_only_the_delivery_directives() {
        let src = "#EXTM3U\r\n\
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=12.0,CAN-SKIP-DATERANGES=YES,PART-HOLD-BACK=1.0,HOLD-BACK=6.0\r\n\
#EXT-X-TARGETDURATION:2\r\n#EXTINF:2,\r\nseg1.ts\r\n\
  #EXT-X-SERVER-CONTROL:can-block-reload=YES,HOLD-BACK=6\n\
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=12\r\n";
        let out = rewrite(src, &Summary::of(src), &base(), mark);
        let expect = "#EXTM3U\r\n\
#EXT-X-SERVER-CONTROL:PART-HOLD-BACK=1.0,HOLD-BACK=6.0\r\n\
#EXT-X-TARGETDURATION:2\r\n#EXTINF:2,\r\nP[seg1.ts|https://cdn.example/hls/v1/seg1.ts]\r\n\
  #EXT-X-SERVER-CONTROL:HOLD-BACK=6\n\
\r\n";
        assert_eq!(out, expect);
        assert_eq!(
            rewrite("#EXTM3U\n#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES", &Summary::default(), &base(), mark),
            "#EXTM3U\n"
        );
        assert_eq!(out.split_inclusive('\n').count(), src.split_inclusive('\n').count());
        // A quoted value keeps its commas.
        assert_eq!(
            server_control("X-A=\"1,CAN-BLOCK-RELOAD=YES\",CAN-BLOCK-RELOAD=YES").as_deref(),
            Some("X-A=\"1,CAN-BLOCK-RELOAD=YES\"")
        );
    }

    #[test]
    fn steering_and_interstitials_are_left_out() {
        let master = "#EXTM3U\n\
#EXT-X-CONTENT-STEERING:SERVER-URI=\"https://steer.example/s.json\",PATHWAY-ID=\"CDN-A\"\n\
#EXT-X-STREAM-INF:BANDWIDTH=1280000,PATHWAY-ID=\"CDN-A\"\n\
a/index.m3u8\n";
        let out = rewrite(master, &Summary::of(master), &base(), mark);
        assert_eq!(
            out,
            "#EXTM3U\n\n#EXT-X-STREAM-INF:BANDWIDTH=1280000,PATHWAY-ID=\"CDN-A\"\n\
P[index.m3u8|https://cdn.example/hls/v1/a/index.m3u8]\n"
        );
        let media = "#EXTM3U\r\n\
#EXT-X-DATERANGE:ID=\"ad1\",CLASS=\"com.apple.hls.interstitial\",START-DATE=\"2026-01-01T00:00:05Z\",X-ASSET-URI=\"https://ads.example/ad.m3u8\"\r\n\
#EXT-X-DATERANGE:ID=\"ad2\",CLASS=\"com.apple.hls.interstitial\",START-DATE=\"2026-01-01T00:00:09Z\",x-asset-list=\"/list.json\"\r\n\
#EXT-X-DATERANGE:ID=\"chapter\",START-DATE=\"2026-01-01T00:00:00Z\",X-TITLE=\"X-ASSET-URI=no\"\r\n\
#EXTINF:4,\r\nseg1.ts\r\n#EXT-X-ENDLIST";
        let out = rewrite(media, &Summary::of(media), &base(), mark);
        assert_eq!(
            out,
            "#EXTM3U\r\n\r\n\r\n\
#EXT-X-DATERANGE:ID=\"chapter\",START-DATE=\"2026-01-01T00:00:00Z\",X-TITLE=\"X-ASSET-URI=no\"\r\n\
#EXTINF:4,\r\nP[seg1.ts|https://cdn.example/hls/v1/seg1.ts]\r\n#EXT-X-ENDLIST"
        );
        assert_eq!(out.split_inclusive('\n').count(), media.split_inclusive('\n').count());
    }

    #[test]
    fn variables_are_substituted_in_the_uris_rewritten() {
        let src = "#EXTM3U\n\
#EXT-X-DEFINE:NAME=\"dir\",VALUE=\"v2\"\n\
 #EXT-X-DEFINE:QUERYPARAM=\"tok\"\r\n\
#EXT-X-DEFINE:QUERYPARAM=\"absent\"\n\
#EXT-X-DEFINE:IMPORT=\"cdn\"\n\
#EXT-X-MAP:URI=\"{$dir}/init.mp4?t={$tok}\"\n\
#EXTINF:4,\n{$dir}/seg1.m4s?t={$tok}&x={$cdn}\n\
#EXTINF:4,\n{$dir/seg2.m4s\n";
        let out = rewrite(src, &Summary::of(src), &base(), mark);
        let expect = "#EXTM3U\n\
#EXT-X-DEFINE:NAME=\"dir\",VALUE=\"v2\"\n\
 #EXT-X-DEFINE:NAME=\"tok\",VALUE=\"abc\"\r\n\
#EXT-X-DEFINE:QUERYPARAM=\"absent\"\n\
#EXT-X-DEFINE:IMPORT=\"cdn\"\n\
#EXT-X-MAP:URI=\"P[init.mp4|https://cdn.example/hls/v1/v2/init.mp4?t=abc]\"\n\
#EXTINF:4,\nP[seg1.m4s|https://cdn.example/hls/v1/v2/seg1.m4s?t=abc&x={$cdn}]\n\
#EXTINF:4,\nP[seg2.m4s|https://cdn.example/hls/v1/%7B$dir/seg2.m4s]\n";
        assert_eq!(out, expect);
        // Without definitions a reference is only a (strange) name.
        let plain = "#EXTM3U\n#EXTINF:4,\n{$dir}/seg1.ts\n";
        assert!(rewrite(plain, &Summary::of(plain), &base(), mark).contains("/v1/%7B$dir%7D/seg1.ts]"));
    }

    #[test]
    fn variable_names_are_read_as_the_spec_writes_them() {
        let src = "#EXTM3U\n\
#EXT-X-DEFINE:NAME=\"a-1_B\",VALUE=\"x\"\n\
#EXT-X-DEFINE:NAME=\"a-1_B\",VALUE=\"y\"\n\
#EXTINF:4,\n{$a-1_B}/{${$a-1_B}/{$a-1_B.ts\n";
        let out = rewrite(src, &Summary::of(src), &base(), mark);
        // The later definition wins; an unclosed reference is left as it is.
        assert!(out.contains("P[%7B$a-1_B.ts|https://cdn.example/hls/v1/y/%7B$y/%7B$a-1_B.ts]"), "{out}");
        // A hoster's line of unclosed references, beside many definitions.
        let mut src = String::from("#EXTM3U\n");
        for i in 0..2000 {
            src.push_str(&format!("#EXT-X-DEFINE:NAME=\"v{i}\",VALUE=\"{i}\"\n"));
        }
        src.push_str(&format!("#EXTINF:4,\n{}{{$v0}}.ts\n", "{$".repeat(100_000)));
        let out = rewrite(&src, &Summary::of(&src), &base(), mark);
        assert!(out.ends_with(&format!("/v1/{}0.ts]\n", "%7B$".repeat(100_000))), "each left as it is but the last");
    }

    #[test]
    fn data_uris_and_detection() {
        let src = "#EXTM3U\n#EXT-X-KEY:METHOD=AES-128,URI=\"data:text/plain;base64,AAAA\"\ndata:,x\n";
        assert_eq!(rewrite(src, &Summary::of(src), &base(), mark), src);
        let bom = "\u{feff}#EXTM3U\nseg.ts\n";
        assert_eq!(
            rewrite(bom, &Summary::of(bom), &base(), mark),
            "\u{feff}#EXTM3U\nP[seg.ts|https://cdn.example/hls/v1/seg.ts]\n"
        );
        assert!(looks_like_playlist(b"#EXTM3U\n"));
        assert!(looks_like_playlist(b"\xEF\xBB\xBF#EXTM3U\r\n"));
        assert!(!looks_like_playlist(b"\x47\x40\x00"));
        assert!(!looks_like_playlist(b" #EXTM3U"));
    }

    #[test]
    fn summaries() {
        let master = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nlow.m3u8\n";
        assert_eq!(Summary::of(master), Summary { master: true, ..Summary::default() });
        let vod = "#EXTM3U\n#EXT-X-MAP:URI=\"i.mp4\"\n#EXTINF:4.004,\na\n#EXTINF:2.5,title\nb\n#EXTINF:bad,\nc\n#EXT-X-ENDLIST\n";
        let s = Summary::of(vod);
        assert!(!s.master && s.ended && s.fmp4);
        assert!((s.duration - 6.504).abs() < 1e-9, "{}", s.duration);
        let live = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nseg.ts\n";
        assert_eq!(Summary::of(live), Summary { duration: 2.0, target_duration: Some(2.0), ..Summary::default() });
        assert_eq!(Summary::of("#EXTM3U\n#EXT-X-TARGETDURATION:x\n").target_duration, None);
    }

    #[test]
    fn children_live_as_long_as_playback_needs() {
        let (token, session) = (900, 6 * 3600);
        let master = Summary { master: true, ..Summary::default() };
        assert_eq!(child_lifetime(&master, token, session), session);
        let vod = Summary { ended: true, duration: 5400.2, ..Summary::default() };
        assert_eq!(child_lifetime(&vod, token, session), 900 + 5401);
        let live = Summary { duration: 5400.0, ..Summary::default() };
        assert_eq!(child_lifetime(&live, token, session), 900);
        let absurd = Summary { ended: true, duration: 1e300, ..Summary::default() };
        assert_eq!(child_lifetime(&absurd, token, session), 900 + MAX_PLAYBACK);
    }

    #[test]
    fn disguised_segments_get_a_name_players_accept() {
        let hint = |u: &str, segment: bool, fmp4: bool| {
            let mut out = String::new();
            push_hint(u, segment, fmp4, &mut out);
            out
        };
        assert_eq!(hint("https://h/a/seg001.ts?t=1", true, false), "seg001.ts");
        assert_eq!(hint("https://h/a/SEG001.TS", true, false), "SEG001.TS");
        assert_eq!(hint("https://h/a/seg001.jpg", true, false), "seg001.jpg.ts");
        assert_eq!(hint("https://h/a/seg001.png", true, true), "seg001.png.m4s");
        assert_eq!(hint("https://h/a/page.html", true, false), "page.html.ts");
        assert_eq!(hint("https://h/a/chunk", true, false), "chunk.ts");
        assert_eq!(hint("https://h/a/", true, false), "stream.ts");
        assert_eq!(hint("https://h/a/part.m4s", true, true), "part.m4s");
        assert_eq!(hint("https://h/subs/en-1.vtt", true, false), "en-1.vtt");
        // Playlists, keys and maps keep their names.
        assert_eq!(hint("https://h/a/key.jpg", false, false), "key.jpg");
        // In a playlist: URI lines of media playlists and parts are segments.
        let media = "#EXTM3U\n#EXT-X-KEY:METHOD=AES-128,URI=\"k.png\"\n#EXT-X-PART:DURATION=1,URI=\"p1.png\"\n#EXTINF:2,\ns1.png\n";
        let out = rewrite(media, &Summary::of(media), &base(), mark);
        assert!(out.contains("URI=\"P[k.png|"), "{out}");
        assert!(out.contains("URI=\"P[p1.png.ts|"), "{out}");
        assert!(out.contains("\nP[s1.png.ts|"), "{out}");
        let master = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nvariant.php\n";
        assert!(rewrite(master, &Summary::of(master), &base(), mark).contains("\nP[variant.php|"));
    }

    #[test]
    fn hints() {
        assert_eq!(hint_for("https://a/b/seg001.ts?x=1"), "seg001.ts");
        assert_eq!(hint_for("https://a/b/"), "stream");
        assert_eq!(hint_for("https://a"), "stream");
        assert_eq!(hint_for("https://a?x=/y.ts"), "stream");
        assert_eq!(hint_for("https://a/x%20y.ts#f"), "x%20y.ts");
    }

    #[test]
    fn plain_resolution_equals_url_join_on_known_shapes() {
        let bases =
            ["https://cdn.example/hls/v1/index.m3u8?tok=abc", "http://cdn.example:8080/a/b", "https://h.example/"];
        let uris = [
            "seg-001.ts",
            "seg-001.ts?token=a&b=c",
            "sub/dir/x.ts",
            "/root/x.ts",
            "/",
            "?only=query",
            "https://other.example/x.ts",
            "https://Other.example/x.ts",
            "https://other.example:443/x.ts",
            "http://other.example",
            "HTTPS://other.example/x",
            "./x.ts",
            "../x.ts",
            "a/./b",
            "a/%2e%2e/b",
            "x y.ts",
            "x\\y.ts",
            "//other.example/x.ts",
            "data:,x",
            "skd://key",
            "a:b/c",
            "x.ts#frag",
            "https://192.168.0.1/x",
            "https://xn--bcher-kva.example/x",
            "%41.ts",
            "x'y.ts",
            "~u/x.ts",
            "http://a.0/",
            "http://cdn.7/x.ts",
            "https://h.0x1f/x",
        ];
        for b in bases {
            let url = Url::parse(b).unwrap();
            let base = Base::new(&url);
            for u in uris {
                let slow = url.join(u).ok().filter(|j| matches!(j.scheme(), "http" | "https")).map(String::from);
                assert_eq!(base.resolve(u).map(Cow::into_owned), slow, "base {b} uri {u}");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4000))]

        /// The fast path is an optimisation only: whatever the reference,
        /// the result is exactly what `Url::join` gives.
        #[test]
        fn resolve_is_url_join(
            uri in "(https?://|/|//|\\.\\./|\\./)?[a-zA-Z0-9._~%:@/?&=+!$'()*,; #-]{0,24}",
            base in proptest::sample::select(vec![
                "https://cdn.example/hls/v1/index.m3u8?tok=abc",
                "http://cdn.example:8080/a/b",
                "https://h.example/",
                "http://10.0.0.1/x/y/",
            ]),
        ) {
            let url = Url::parse(base).unwrap();
            let slow = url.join(&uri).ok().filter(|j| matches!(j.scheme(), "http" | "https")).map(String::from);
            proptest::prop_assert_eq!(Base::new(&url).resolve(&uri).map(Cow::into_owned), slow);
        }

        /// Rewriting never panics, keeps the line count and every non-URI
        /// line byte for byte, but for the tags it changes on purpose
        /// (checked by the tests above).
        #[test]
        fn rewrite_keeps_structure(lines in proptest::collection::vec("(#EXT[A-Z-]{0,8}:[ -~]{0,20}|#EXT-X-(DEFINE|DATERANGE|CONTENT-STEERING|SERVER-CONTROL):[ -~]{0,30}|#[ -~]{0,10}|[ -~]{0,30}|)", 0..20), crlf in proptest::bool::ANY, bom in proptest::bool::ANY, piece in 1..200usize) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let text = lines.join(nl);
            let mark = |u: &str, _, o: &mut String| o.push_str(&format!("<{u}>"));
            let out = rewrite(&text, &Summary::of(&text), &base(), mark);
            // Piece by piece, the same bytes, each piece whole lines.
            let with_bom = format!("{}{text}", if bom { "\u{feff}" } else { "" });
            let url = base();
            let mut pieces = Rewrite::new(&with_bom, &Summary::of(&with_bom), &url, mark);
            let (mut joined, mut piece_buf) = (String::new(), String::new());
            loop {
                let more = pieces.next_piece(&mut piece_buf, piece);
                proptest::prop_assert!(!more || piece_buf.len() >= piece);
                let whole_lines = piece_buf.ends_with('\n') || piece_buf == "\u{feff}";
                proptest::prop_assert!(!more || whole_lines, "a piece ends with a whole line");
                joined.push_str(&std::mem::take(&mut piece_buf));
                if !more {
                    break;
                }
            }
            proptest::prop_assert_eq!(joined.strip_prefix(if bom { "\u{feff}" } else { "" }), Some(&*out));
            proptest::prop_assert_eq!(out.split(nl).count(), text.split(nl).count());
            let changed = [DEFINE, SERVER_CONTROL, "#EXT-X-DATERANGE:", "#EXT-X-CONTENT-STEERING:"];
            for (a, b) in text.split(nl).zip(out.split(nl)) {
                if changed.iter().any(|t| a.trim().starts_with(t)) {
                    continue;
                }
                if a.trim().is_empty() || (a.trim_start().starts_with('#') && !a.contains("URI=\"")) {
                    proptest::prop_assert_eq!(a, b);
                }
            }
        }
    }
}
