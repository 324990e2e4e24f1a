//! Loopback stand-ins for the two AWS services the real `nodeadm init` talks to, speaking their
//! real wire protocols, so nodeadm itself runs unmodified outside EC2:
//!
//! - **IMDSv2** (the instance metadata service): `PUT /latest/api/token` with
//!   `X-aws-ec2-metadata-token-ttl-seconds` (1..=21600) issues a session token, returned as
//!   `text/plain` with the TTL echoed in a response header (the AWS SDK for Go v2 parses it); every
//!   other request must carry that token in `X-aws-ec2-metadata-token` (401 without it, as on an
//!   instance with `HttpTokens=required`). Served: `/latest/user-data`
//!   (`application/octet-stream`), `/latest/dynamic/instance-identity/document` (JSON), and a
//!   few `/latest/meta-data/` leaves (`mac`, `local-ipv4`, `instance-id`, `instance-type`,
//!   `placement/...`, `local-hostname`, `network/interfaces/macs/...`), 404 otherwise.
//! - **EC2's query API** (`POST /`, `application/x-www-form-urlencoded`, `Version=2016-11-15`,
//!   SigV4-signed): `DescribeInstances` by `InstanceId.N` answered with the XML document the SDK's
//!   `awsEc2query` deserializer reads (`reservationSet/item/instancesSet/item/...`); an unknown
//!   instance is `InvalidInstanceID.NotFound` and any other action `InvalidAction`, both in EC2's
//!   error envelope (`Response/Errors/Error/{Code,Message}`, `RequestID`). The `Authorization`
//!   header must be SigV4 with the configured access key and the `{region}/ec2/aws4_request`
//!   scope (the signature itself is not recomputed).
//!
//! Point a client at them with [`AwsStandIn::env`] (`AWS_EC2_METADATA_SERVICE_ENDPOINT`,
//! `AWS_ENDPOINT_URL_EC2`, `AWS_REGION`, static credentials); [`AwsStandIn::systemd_dropin`] is
//! the same as a unit drop-in. Every request is logged ([`AwsStandIn::requests`]) with the answer
//! it got. One thread per connection, `Connection: close` on every response; servers stop when
//! the value drops.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The EC2 API version every SDK sends.
pub const EC2_API_VERSION: &str = "2016-11-15";
/// Fake static credentials (never valid anywhere).
pub const ACCESS_KEY_ID: &str = "AKIAE2ESTANDIN000001";
pub const SECRET_ACCESS_KEY: &str = "e2e/stand-in/secret/key/not/a/real/one0000";

/// What the instance looks like.
#[derive(Debug, Clone)]
pub struct Instance {
    pub instance_id: String,
    pub instance_type: String,
    pub region: String,
    pub availability_zone: String,
    pub account_id: String,
    pub image_id: String,
    pub mac: String,
    pub local_ipv4: String,
    pub private_dns_name: String,
}

impl Instance {
    /// An m5.xlarge in us-west-2a (an instance type nodeadm knows offline, so it does not call
    /// `DescribeInstanceTypes`).
    pub fn m5_xlarge() -> Instance {
        Instance {
            instance_id: "i-0e2e5a0c1a9e47b01".into(),
            instance_type: "m5.xlarge".into(),
            region: "us-west-2".into(),
            availability_zone: "us-west-2a".into(),
            account_id: "111122223333".into(),
            image_id: "ami-0e2e0000000000001".into(),
            mac: "0e:2e:5a:0c:1a:01".into(),
            local_ipv4: "10.0.42.17".into(),
            private_dns_name: "ip-10-0-42-17.us-west-2.compute.internal".into(),
        }
    }
}

/// Which stand-in a request reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Imds,
    Ec2,
}

/// One request and the status it got.
#[derive(Debug, Clone)]
pub struct Request {
    pub service: Service,
    pub method: String,
    /// The path (IMDS) or the `Action` (EC2).
    pub target: String,
    pub status: u16,
}

struct State {
    instance: Instance,
    user_data: Option<Vec<u8>>,
    /// token -> expiry
    tokens: HashMap<String, Instant>,
    log: Vec<Request>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Server {
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

/// IMDSv2 and EC2 on two loopback ports (see the module docs).
pub struct AwsStandIn {
    shared: Arc<Shared>,
    imds: Server,
    ec2: Server,
}

impl AwsStandIn {
    /// Starts both servers for `instance`, serving `user_data` (None: 404, as an instance
    /// launched without user data).
    pub fn start(instance: Instance, user_data: Option<Vec<u8>>) -> AwsStandIn {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                instance,
                user_data,
                tokens: HashMap::new(),
                log: Vec::new(),
            }),
            stop: AtomicBool::new(false),
        });
        let imds = serve(&shared, Service::Imds);
        let ec2 = serve(&shared, Service::Ec2);
        AwsStandIn { shared, imds, ec2 }
    }

    /// `http://127.0.0.1:PORT` of the metadata service.
    pub fn imds_endpoint(&self) -> String {
        format!("http://{}", self.imds.addr)
    }

    /// `http://127.0.0.1:PORT` of the EC2 API.
    pub fn ec2_endpoint(&self) -> String {
        format!("http://{}", self.ec2.addr)
    }

    pub fn instance(&self) -> Instance {
        self.shared.lock().instance.clone()
    }

    /// The environment that points the AWS SDKs (and so nodeadm) at these stand-ins.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", self.imds_endpoint()),
            ("AWS_ENDPOINT_URL_EC2", self.ec2_endpoint()),
            ("AWS_REGION", self.instance().region),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.into()),
        ]
    }

    /// [`AwsStandIn::env`] as a systemd unit drop-in (`[Service] Environment=...`).
    pub fn systemd_dropin(&self) -> String {
        let mut s =
            String::from("# Test only: the AWS endpoints are loopback stand-ins (tests/common/imds.rs).\n[Service]\n");
        for (k, v) in self.env() {
            s.push_str(&format!("Environment=\"{k}={v}\"\n"));
        }
        s
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().log.clone()
    }
}

impl Drop for AwsStandIn {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for server in [&mut self.imds, &mut self.ec2] {
            // Wake the blocking accept so the acceptor sees the flag.
            let _ = TcpStream::connect(server.addr);
            if let Some(acceptor) = server.acceptor.take() {
                let _ = acceptor.join();
            }
        }
    }
}

fn serve(shared: &Arc<Shared>, service: Service) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback AWS stand-in");
    let addr = listener.local_addr().unwrap();
    let shared = Arc::clone(shared);
    let acceptor = thread::spawn(move || {
        for conn in listener.incoming() {
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            if let Ok(conn) = conn {
                let shared = Arc::clone(&shared);
                thread::spawn(move || handle(conn, &shared, service));
            }
        }
    });
    Server {
        addr,
        acceptor: Some(acceptor),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1, one request per connection.

struct HttpRequest {
    method: String,
    /// Path with the query string.
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or(&self.target)
    }
}

struct HttpResponse {
    status: u16,
    content_type: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        HttpResponse {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "text/plain", body)
    }
}

fn read_request(conn: &mut TcpStream) -> Option<HttpRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split_whitespace();
    let method = request_line.next()?.to_string();
    let target = request_line.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut req = HttpRequest {
        method,
        target,
        headers,
        body: buf[head_end + 4..].to_vec(),
    };
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        req.body = read_chunked(conn, std::mem::take(&mut req.body))?;
    } else {
        let len: usize = req.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        while req.body.len() < len {
            let n = conn.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            req.body.extend_from_slice(&chunk[..n]);
        }
        req.body.truncate(len);
    }
    Some(req)
}

/// Decodes a chunked body, reading more from `conn` as needed.
fn read_chunked(conn: &mut TcpStream, mut raw: Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut pos = 0;
    let mut chunk = [0u8; 4096];
    let mut more = |raw: &mut Vec<u8>| -> Option<()> {
        let n = conn.read(&mut chunk).ok()?;
        (n > 0).then(|| raw.extend_from_slice(&chunk[..n]))
    };
    loop {
        let line_end = loop {
            if let Some(i) = raw[pos..].windows(2).position(|w| w == b"\r\n") {
                break pos + i;
            }
            more(&mut raw)?;
        };
        let size_text = String::from_utf8_lossy(&raw[pos..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        pos = line_end + 2;
        while raw.len() < pos + size + 2 {
            more(&mut raw)?;
        }
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(&raw[pos..pos + size]);
        pos += size + 2;
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

fn write_response(conn: &mut TcpStream, method: &str, r: &HttpResponse) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nServer: EC2ws\r\nConnection: close\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    if method != "HEAD" {
        conn.write_all(&r.body)?;
    }
    conn.flush()
}

fn handle(mut conn: TcpStream, shared: &Shared, service: Service) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let Some(req) = read_request(&mut conn) else {
        return;
    };
    let (target, resp) = match service {
        Service::Imds => (req.path().to_string(), imds(&req, shared)),
        Service::Ec2 => ec2(&req, shared),
    };
    shared.lock().log.push(Request {
        service,
        method: req.method.clone(),
        target,
        status: resp.status,
    });
    let _ = write_response(&mut conn, &req.method, &resp);
    let _ = conn.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------------------------
// IMDSv2.

const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";

fn imds(req: &HttpRequest, shared: &Shared) -> HttpResponse {
    let path = req.path();
    if path == "/latest/api/token" {
        if req.method != "PUT" {
            return HttpResponse::text(405, "");
        }
        // IMDS refuses token requests that went through a proxy.
        if req.header("x-forwarded-for").is_some() {
            return HttpResponse::text(403, "");
        }
        let ttl: Option<u64> = req.header(TOKEN_TTL_HEADER).and_then(|v| v.trim().parse().ok());
        let Some(ttl) = ttl.filter(|t| (1..=21600).contains(t)) else {
            return HttpResponse::text(400, "");
        };
        let token = new_token();
        shared
            .lock()
            .tokens
            .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        let mut r = HttpResponse::text(200, token);
        r.headers.push((TOKEN_TTL_HEADER.into(), ttl.to_string()));
        return r;
    }
    if req.method != "GET" && req.method != "HEAD" {
        return HttpResponse::text(405, "");
    }
    let authorized = req.header(TOKEN_HEADER).is_some_and(|t| {
        shared
            .lock()
            .tokens
            .get(t)
            .is_some_and(|expiry| Instant::now() < *expiry)
    });
    if !authorized {
        return HttpResponse::text(401, "");
    }
    let state = shared.lock();
    let i = &state.instance;
    let macs = format!("/latest/meta-data/network/interfaces/macs/{}/", i.mac);
    let leaf = |v: &str| HttpResponse::text(200, v.to_string());
    match path {
        "/latest/user-data" | "/latest/user-data/" => match &state.user_data {
            Some(data) => HttpResponse::new(200, "application/octet-stream", data.clone()),
            None => not_found(),
        },
        "/latest/dynamic/instance-identity/document" => HttpResponse::text(200, identity_document(i)),
        "/latest/meta-data/mac" => leaf(&i.mac),
        "/latest/meta-data/local-ipv4" => leaf(&i.local_ipv4),
        "/latest/meta-data/instance-id" => leaf(&i.instance_id),
        "/latest/meta-data/instance-type" => leaf(&i.instance_type),
        "/latest/meta-data/ami-id" => leaf(&i.image_id),
        "/latest/meta-data/local-hostname" | "/latest/meta-data/hostname" => leaf(&i.private_dns_name),
        "/latest/meta-data/placement/region" => leaf(&i.region),
        "/latest/meta-data/placement/availability-zone" => leaf(&i.availability_zone),
        "/latest/meta-data/network/interfaces/macs" | "/latest/meta-data/network/interfaces/macs/" => {
            leaf(&format!("{}/", i.mac))
        }
        p if p.starts_with(&macs) => match &p[macs.len()..] {
            "device-number" | "network-card" => leaf("0"),
            "local-ipv4s" => leaf(&i.local_ipv4),
            "mac" => leaf(&i.mac),
            _ => not_found(),
        },
        _ => not_found(),
    }
}

fn not_found() -> HttpResponse {
    HttpResponse::new(
        404,
        "text/html",
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<html><head><title>404 - Not Found</title></head>\
         <body><h1>404 - Not Found</h1></body></html>\n",
    )
}

fn identity_document(i: &Instance) -> String {
    let doc = serde_json::json!({
        "accountId": i.account_id,
        "architecture": "x86_64",
        "availabilityZone": i.availability_zone,
        "billingProducts": null,
        "devpayProductCodes": null,
        "marketplaceProductCodes": null,
        "imageId": i.image_id,
        "instanceId": i.instance_id,
        "instanceType": i.instance_type,
        "kernelId": null,
        "pendingTime": "2026-12-01T00:00:00Z",
        "privateIp": i.local_ipv4,
        "ramdiskId": null,
        "region": i.region,
        "version": "2017-09-30",
    });
    serde_json::to_string_pretty(&doc).unwrap()
}

fn new_token() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..56)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// EC2 query API.

const XML: &str = "text/xml;charset=UTF-8";

fn ec2(req: &HttpRequest, shared: &Shared) -> (String, HttpResponse) {
    let form = parse_form(&String::from_utf8_lossy(&req.body));
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let action = get("Action").unwrap_or("").to_string();
    let shown = if action.is_empty() {
        format!("{} {}", req.method, req.path())
    } else {
        action.clone()
    };
    if req.method != "POST" || req.path() != "/" {
        return (
            shown,
            ec2_error(400, "InvalidAction", "The action or operation is not valid"),
        );
    }
    let form_type = req.header("content-type").unwrap_or("");
    if !form_type.starts_with("application/x-www-form-urlencoded") {
        return (
            shown,
            ec2_error(
                400,
                "MalformedQueryString",
                &format!("unexpected Content-Type {form_type:?}"),
            ),
        );
    }
    let region = shared.lock().instance.region.clone();
    if let Err(why) = check_sigv4(req, &region) {
        return (shown, ec2_error(401, "AuthFailure", &why));
    }
    if get("Version") != Some(EC2_API_VERSION) {
        return (
            shown,
            ec2_error(400, "InvalidParameterValue", &format!("Version {:?}", get("Version"))),
        );
    }
    let response = match action.as_str() {
        "DescribeInstances" => {
            let ids: Vec<&str> = form
                .iter()
                .filter(|(k, _)| k.starts_with("InstanceId."))
                .map(|(_, v)| v.as_str())
                .collect();
            let instance = shared.lock().instance.clone();
            match ids.iter().find(|id| **id != instance.instance_id) {
                Some(unknown) => ec2_error(
                    400,
                    "InvalidInstanceID.NotFound",
                    &format!("The instance ID '{unknown}' does not exist"),
                ),
                None => HttpResponse::new(200, XML, describe_instances(&instance)),
            }
        }
        _ => ec2_error(
            400,
            "InvalidAction",
            &format!("The action {action} is not valid for this web service."),
        ),
    };
    (shown, response)
}

/// `Authorization: AWS4-HMAC-SHA256 Credential=AKID/yyyymmdd/REGION/ec2/aws4_request,
/// SignedHeaders=..., Signature=...` with an `X-Amz-Date`.
fn check_sigv4(req: &HttpRequest, region: &str) -> Result<(), String> {
    let auth = req.header("authorization").ok_or("no Authorization header")?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| format!("not SigV4: {auth}"))?;
    let field = |name: &str| {
        rest.split(',')
            .map(str::trim)
            .find_map(|p| p.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let credential = field("Credential").ok_or("no Credential")?;
    let parts: Vec<&str> = credential.split('/').collect();
    let scope_ok = parts.len() == 5
        && parts[0] == ACCESS_KEY_ID
        && parts[1].len() == 8
        && parts[2] == region
        && parts[3] == "ec2"
        && parts[4] == "aws4_request";
    if !scope_ok {
        return Err(format!("credential scope {credential:?}"));
    }
    let signed = field("SignedHeaders").ok_or("no SignedHeaders")?;
    if !signed.split(';').any(|h| h == "host") || !signed.split(';').any(|h| h == "x-amz-date") {
        return Err(format!("SignedHeaders {signed:?}"));
    }
    let signature = field("Signature").ok_or("no Signature")?;
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("Signature {signature:?}"));
    }
    req.header("x-amz-date").ok_or("no X-Amz-Date")?;
    Ok(())
}

fn ec2_error(status: u16, code: &str, message: &str) -> HttpResponse {
    HttpResponse::new(
        status,
        XML,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message>\
             </Error></Errors><RequestID>{}</RequestID></Response>",
            xml_escape(code),
            xml_escape(message),
            request_id()
        ),
    )
}

fn describe_instances(i: &Instance) -> String {
    let e = xml_escape;
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/{EC2_API_VERSION}/">
    <requestId>{request_id}</requestId>
    <reservationSet>
        <item>
            <reservationId>r-0e2e5a0c1a9e47b01</reservationId>
            <ownerId>{account}</ownerId>
            <groupSet/>
            <instancesSet>
                <item>
                    <instanceId>{id}</instanceId>
                    <imageId>{image}</imageId>
                    <instanceState>
                        <code>16</code>
                        <name>running</name>
                    </instanceState>
                    <privateDnsName>{dns}</privateDnsName>
                    <dnsName/>
                    <amiLaunchIndex>0</amiLaunchIndex>
                    <instanceType>{itype}</instanceType>
                    <launchTime>2026-12-01T00:00:00.000Z</launchTime>
                    <placement>
                        <availabilityZone>{az}</availabilityZone>
                        <tenancy>default</tenancy>
                    </placement>
                    <privateIpAddress>{ip}</privateIpAddress>
                    <architecture>x86_64</architecture>
                    <rootDeviceType>ebs</rootDeviceType>
                    <rootDeviceName>/dev/xvda</rootDeviceName>
                    <networkInterfaceSet>
                        <item>
                            <networkInterfaceId>eni-0e2e5a0c1a9e47b01</networkInterfaceId>
                            <macAddress>{mac}</macAddress>
                            <privateIpAddress>{ip}</privateIpAddress>
                            <privateDnsName>{dns}</privateDnsName>
                            <attachment>
                                <deviceIndex>0</deviceIndex>
                                <networkCardIndex>0</networkCardIndex>
                            </attachment>
                        </item>
                    </networkInterfaceSet>
                </item>
            </instancesSet>
        </item>
    </reservationSet>
</DescribeInstancesResponse>
"#,
        request_id = request_id(),
        account = e(&i.account_id),
        id = e(&i.instance_id),
        image = e(&i.image_id),
        dns = e(&i.private_dns_name),
        itype = e(&i.instance_type),
        az = e(&i.availability_zone),
        ip = e(&i.local_ipv4),
        mac = e(&i.mac),
    )
}

fn request_id() -> String {
    let h = |n: usize| -> String { (0..n).map(|_| format!("{:x}", fastrand::u8(..16))).collect() };
    format!("{}-{}-{}-{}-{}", h(8), h(4), h(4), h(4), h(12))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `application/x-www-form-urlencoded` pairs, in order.
fn parse_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
