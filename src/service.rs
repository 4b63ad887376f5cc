//! Service files printed by `tunnel service`: a sandboxed systemd unit for each long-running mode
//! (`signal`, `serve`, `proxy`) and a procd init script for `serve` on OpenWrt. The repository
//! holds no such files; the binary prints them, so they always match its own flags and
//! environment variables. Each reads its settings from `/etc/tunnel/<mode>.env`.

use crate::cli::ServiceOpts;

/// The modes a service can run.
const MODES: [&str; 3] = ["signal", "serve", "proxy"];

/// The default path of the executable in a systemd unit.
pub const SYSTEMD_BIN: &str = "/usr/local/bin/tunnel";
/// The default path of the executable on OpenWrt.
pub const OPENWRT_BIN: &str = "/usr/bin/tunnel";

/// The text `tunnel service <system> <mode>` prints, or why there is none.
pub fn render(opts: &ServiceOpts) -> Result<String, String> {
    if !MODES.contains(&opts.mode.as_str()) {
        return Err(format!(
            "unknown mode '{}': expected signal, serve or proxy",
            opts.mode
        ));
    }
    if let Some(bin) = &opts.bin {
        let plain = bin
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b));
        if !bin.starts_with('/') || !plain {
            return Err(format!(
                "--bin '{bin}': give an absolute path of letters, digits and / . _ - +"
            ));
        }
    }
    match opts.system.as_str() {
        "systemd" => Ok(systemd(
            &opts.mode,
            opts.bin.as_deref().unwrap_or(SYSTEMD_BIN),
        )),
        "openwrt" if opts.mode == "serve" => {
            Ok(openwrt_serve(opts.bin.as_deref().unwrap_or(OPENWRT_BIN)))
        }
        "openwrt" => Err(format!(
            "no OpenWrt script for '{}': a router runs `tunnel service openwrt serve`",
            opts.mode
        )),
        other => Err(format!(
            "unknown service system '{other}': expected systemd or openwrt"
        )),
    }
}

/// The environment file's variables for a mode, as commented example lines.
fn env_example(mode: &str) -> &'static str {
    match mode {
        "signal" => {
            "#   PORT=8787                      TCP port (the STUN responder uses the same UDP port)\n\
             #   TUNNEL_ARGS=--max-consumers 8  more flags (see tunnel signal --help)\n"
        }
        "serve" => {
            "#   TUNNEL_ROOM=my-llm                       required\n\
             #   TUNNEL_UPSTREAM=http://127.0.0.1:11434   required\n\
             #   TUNNEL_SECRET=...                        from `tunnel secret`; the same on every proxy\n\
             #   TUNNEL_SIGNAL=wss://signal.example.org   without it serve hosts the signal server on :8787\n\
             #   TUNNEL_ARGS=--max-consumers 8            more flags (see tunnel serve --help)\n"
        }
        _ => {
            "#   TUNNEL_SIGNAL=ws://home.example.org:8787   required\n\
             #   TUNNEL_ROOM=my-llm                         required\n\
             #   TUNNEL_SECRET=...                          the provider's secret\n\
             #   TUNNEL_LISTEN=127.0.0.1:8000               where the proxy listens\n\
             #   TUNNEL_ARGS=                               more flags (see tunnel proxy --help)\n"
        }
    }
}

/// A systemd unit for `mode`: sandboxed, restarted on failure, settings from the env file.
fn systemd(mode: &str, bin: &str) -> String {
    let description = match mode {
        "signal" => "tunnel signal: WebRTC rendezvous and STUN for tunnel peers",
        "serve" => "tunnel serve: a local HTTP API, offered through a WebRTC tunnel",
        _ => "tunnel proxy: a local HTTP endpoint for an API behind a WebRTC tunnel",
    };
    // serve re-reads --secret-file on SIGHUP; the signal server holds a socket per client.
    let extra = match mode {
        "serve" => "ExecReload=/bin/kill -HUP $MAINPID\n",
        "signal" => "LimitNOFILE=65536\n",
        _ => "",
    };
    format!(
        "# {description}\n\
         # Written by `tunnel service systemd {mode}` (tunnel {version}). Install:\n\
         #   tunnel service systemd {mode} > /etc/systemd/system/tunnel-{mode}.service\n\
         #   mkdir -p /etc/tunnel && $EDITOR /etc/tunnel/{mode}.env && chmod 600 /etc/tunnel/{mode}.env\n\
         #   systemctl daemon-reload && systemctl enable --now tunnel-{mode}\n\
         # /etc/tunnel/{mode}.env holds VAR=value lines (read by systemd as root, so it can hold the\n\
         # secret with mode 600), e.g.\n\
         {env}\
         # Logs: journalctl -u tunnel-{mode} (RUST_LOG=debug in the env file: one line per request).\n\
         \n\
         [Unit]\n\
         Description={description}\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=exec\n\
         EnvironmentFile=/etc/tunnel/{mode}.env\n\
         ExecStart={bin} {mode} $TUNNEL_ARGS\n\
         {extra}\
         Restart=on-failure\n\
         RestartSec=5s\n\
         # SIGTERM ends it cleanly (serve and proxy say bye to the peer) with exit code 0.\n\
         KillSignal=SIGTERM\n\
         \n\
         # Sandbox: an unprivileged user made up per start, no capabilities, a read-only system,\n\
         # network sockets only.\n\
         DynamicUser=yes\n\
         NoNewPrivileges=yes\n\
         CapabilityBoundingSet=\n\
         AmbientCapabilities=\n\
         ProtectSystem=strict\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         PrivateDevices=yes\n\
         PrivateUsers=yes\n\
         ProtectHostname=yes\n\
         ProtectClock=yes\n\
         ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectControlGroups=yes\n\
         ProtectProc=invisible\n\
         ProcSubset=pid\n\
         RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n\
         RestrictNamespaces=yes\n\
         RestrictRealtime=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         MemoryDenyWriteExecute=yes\n\
         RemoveIPC=yes\n\
         UMask=0077\n\
         SystemCallArchitectures=native\n\
         SystemCallFilter=@system-service\n\
         SystemCallFilter=~@privileged @resources\n\
         SystemCallErrorNumber=EPERM\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        version = env!("CARGO_PKG_VERSION"),
        env = env_example(mode),
    )
}

/// A procd init script for `tunnel serve` on OpenWrt, reading /etc/tunnel/serve.env.
fn openwrt_serve(bin: &str) -> String {
    format!(
        "#!/bin/sh /etc/rc.common\n\
         # tunnel serve under procd (OpenWrt). Written by `tunnel service openwrt serve`\n\
         # (tunnel {version}). Install:\n\
         #   tunnel service openwrt serve > /etc/init.d/tunnel && chmod 755 /etc/init.d/tunnel\n\
         #   mkdir -p /etc/tunnel && vi /etc/tunnel/serve.env && chmod 600 /etc/tunnel/serve.env\n\
         #   /etc/init.d/tunnel enable && /etc/init.d/tunnel start\n\
         # /etc/tunnel/serve.env holds VAR=value lines (shell syntax), e.g.\n\
         {env}\
         # Logs: logread -e tunnel. Re-read --secret-file: /etc/init.d/tunnel reload (SIGHUP).\n\
         \n\
         USE_PROCD=1\n\
         START=95\n\
         STOP=10\n\
         \n\
         PROG={bin}\n\
         ENV_FILE=/etc/tunnel/serve.env\n\
         \n\
         start_service() {{\n\
         \t[ -r \"$ENV_FILE\" ] || {{ echo \"tunnel: $ENV_FILE is missing\" >&2; return 1; }}\n\
         \tTUNNEL_ARGS=\n\
         \t. \"$ENV_FILE\"\n\
         \tprocd_open_instance\n\
         \t# shellcheck disable=SC2086 # TUNNEL_ARGS holds several flags\n\
         \tprocd_set_param command \"$PROG\" serve $TUNNEL_ARGS\n\
         \tfor var in TUNNEL_SIGNAL TUNNEL_ROOM TUNNEL_UPSTREAM TUNNEL_SECRET TUNNEL_ICE_ADDR \\\n\
         \t\tTUNNEL_TURN TUNNEL_TURN_USER TUNNEL_TURN_PASS RUST_LOG; do\n\
         \t\teval \"value=\\${{$var:-}}\"\n\
         \t\t[ -n \"$value\" ] && procd_append_param env \"$var=$value\"\n\
         \tdone\n\
         \tprocd_set_param user nobody\n\
         \tprocd_set_param no_new_privs 1\n\
         \tprocd_set_param respawn 3600 5 0\n\
         \tprocd_set_param stdout 1\n\
         \tprocd_set_param stderr 1\n\
         \tprocd_set_param term_timeout 5\n\
         \tprocd_close_instance\n\
         }}\n\
         \n\
         reload_service() {{\n\
         \tprocd_send_signal tunnel '*' HUP\n\
         }}\n",
        version = env!("CARGO_PKG_VERSION"),
        env = env_example("serve"),
    )
}
