-- Prosody (0.12 or newer) side of caseroom: declare the external component (XEP-0114).
--
-- Put this in its own file, e.g. /etc/prosody/conf.d/caseroom.cfg.lua (Debian's
-- prosody.cfg.lua ends with Include "conf.d/*.cfg.lua"), replacing rooms.example.org and
-- the secret. Then:
--   prosodyctl check config        -- flags global options placed under a host
--   systemctl restart prosody      -- a reload adds neither new components nor ports
-- and start caseroom with the matching [component] section:
--   jid = "rooms.example.org", server = "127.0.0.1:5347", secret_file = "/etc/caseroom/secret"

------ Global section ------
-- These two must be global. Every included file starts in the global section, so at the
-- top of this file they are; in prosody.cfg.lua itself they must come before the first
-- VirtualHost or Component line, or they silently apply to that host instead.
--
-- The component stream is plaintext (a SHA-1 handshake, no TLS): keep the listener on
-- loopback when caseroom runs on the same machine. Otherwise listen on a private address
-- only, or tunnel it; never expose it to the internet.
component_ports = { 5347 }
component_interfaces = { "127.0.0.1" }

-- Recommended: read 64 KiB at a time (Prosody's default is 4096 bytes). caseroom sends one
-- stanza per recipient, so at a busy moment (a join storm, a burst of events) its stream is
-- megabytes long. LuaSocket buffers 8 KiB per read; with 4 KiB reads, half of it is left
-- over after every other read, and Prosody then pauses the connection until its next timer
-- tick (at least 1 ms) before reading on. Measured on Prosody 0.12.3 (BENCHMARKS.md
-- section 9): a storm of 200 joins goes from 0.46 to 0.65-0.83 of Prosody's own MUC, whose
-- clients' small reads never meet the pause. It is a global setting (every listener reads
-- up to this much at once); Prosody's stanza size limits are unaffected.
network_default_read_size = 65536

------ The component ------
-- caseroom IS the group-chat (MUC) service of this domain, with its own archive (MAM).
-- So this is a plain external Component: no module name after the domain (not
-- Component "rooms.example.org" "muc"), and no modules_enabled = { "muc_mam" } here.
-- Prosody's built-in MUC, if you keep it, must live on another domain
-- (e.g. conference.example.org).
Component "rooms.example.org"
    -- The same value as caseroom's component.secret (or the contents of its
    -- component.secret_file). Make one with: openssl rand -hex 24
    component_secret = "change-me"

-- Only one caseroom may be connected at a time: Prosody refuses a second connection for
-- the same domain ("conflict"; see component_conflict_resolve).
--
-- Discovery: rooms.example.org is a subdomain of VirtualHost "example.org", so Prosody lists
-- it in example.org's disco#items and clients find it as a group-chat service.
--
-- Federation (users of other servers joining rooms): remote servers connect to
-- rooms.example.org over s2s, so the name needs DNS (an A/AAAA record, or an SRV record
-- _xmpp-server._tcp.rooms.example.org pointing at this server) and a certificate that
-- covers it, e.g. with: prosodyctl --root cert import /etc/letsencrypt/live

------ Optional: rooms in members' bookmarks (XEP-0356 + XEP-0402) ------
-- With this, every member of a tracker-synced room finds it in their client's bookmarks
-- (autojoin), and it goes away when the tracker takes their access away. Without it,
-- caseroom sends them an XEP-0249 invitation instead. Needs Debian's prosody-modules
-- (apt-get install prosody-modules) for mod_privilege; "pep" and "bookmarks" ship with
-- Prosody 0.12. Three places, all needed (checked with prosody-modules 0.0~hg20230223):
--
-- 1. modules_enabled in the global section: add "pep", "bookmarks", "privilege".
-- 2. In the VirtualHost whose users caseroom may bookmark for (one block per host):
--      VirtualHost "example.org"
--          privileged_entities = {
--              ["rooms.example.org"] = {
--                  iq = { ["http://jabber.org/protocol/pubsub"] = "set" };
--              };
--          }
--    This lets caseroom send pubsub "set" IQs as any user of example.org: grant nothing else.
-- 3. In the Component section above:
--          modules_enabled = { "privilege" }
--    (so that the module sees caseroom authenticate and tells it what it may do).
--
-- caseroom logs "the server lets caseroom write its users' bookmarks" at start when it works.
