//! The nginx edge of a chaos stack: `infra/nginx.conf`'s proxying rules (least_conn over the
//! gateways, WebSocket upgrade, next upstream on a refused connection) on the stack's own ports,
//! with every path inside the stack's directory.

/// The configuration for an nginx listening on `port` in front of `gateways`.
#[must_use]
pub fn config(port: u16, gateways: &[u16]) -> String {
    let servers: String = gateways
        .iter()
        .map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n"))
        .collect();
    format!(
        r#"# Written by colloquy-chaos; the proxying rules of infra/nginx.conf on this stack's ports.
worker_processes  1;
pid               nginx/nginx.pid;
error_log         nginx/error.log warn;

events {{
    worker_connections  4096;
}}

http {{
    access_log  nginx/access.log;

    client_body_temp_path  nginx/temp-client-body;
    proxy_temp_path        nginx/temp-proxy;
    fastcgi_temp_path      nginx/temp-fastcgi;
    uwsgi_temp_path        nginx/temp-uwsgi;
    scgi_temp_path         nginx/temp-scgi;

    tcp_nodelay        on;
    keepalive_timeout  65s;

    map $http_upgrade $connection_upgrade {{
        default  upgrade;
        ''       '';
    }}

    upstream colloquy_gateways {{
        least_conn;
{servers}        keepalive 32;
    }}

    server {{
        listen  127.0.0.1:{port};

        proxy_http_version     1.1;
        proxy_connect_timeout  2s;
        proxy_set_header       Host $host;
        proxy_next_upstream    error timeout http_502 http_503;
        proxy_next_upstream_tries 2;

        location /ws {{
            proxy_pass          http://colloquy_gateways;
            proxy_set_header    Upgrade    $http_upgrade;
            proxy_set_header    Connection $connection_upgrade;
            proxy_buffering     off;
            proxy_read_timeout  3600s;
            proxy_send_timeout  3600s;
        }}

        location / {{
            proxy_pass          http://colloquy_gateways;
            proxy_set_header    Connection "";
            proxy_read_timeout  60s;
        }}
    }}
}}
"#
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_every_gateway_and_listens_on_the_port() {
        let conf = super::config(18080, &[18001, 18002]);
        assert!(conf.contains("listen  127.0.0.1:18080;"));
        assert!(conf.contains("server 127.0.0.1:18001 max_fails=1"));
        assert!(conf.contains("server 127.0.0.1:18002 max_fails=1"));
    }
}
