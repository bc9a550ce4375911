#!/usr/bin/env python3
"""How much CPU Prosody spends per stanza a component sends, by stanza shape.

Explains the fan-out and MAM ratios of `cargo bench --bench muc`: every stanza caseroom sends is parsed and
routed by Prosody, and that cost grows with each namespaced child element. Run: python3 benches/prosody_component_cost.py
"""
import socket, hashlib, time, subprocess, os, sys, threading, base64, tempfile, re
D=tempfile.mkdtemp(); os.chmod(D,0o755)
def fp():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
c2s, comp = fp(), fp()
subprocess.run([os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "servers", "prosody.sh"), D, str(c2s), str(comp), "rooms.localhost", "s"], check=True, stdout=subprocess.DEVNULL)
pid=int(open(D+"/server.pid").read())
def cpu():
    f=open(f"/proc/{pid}/stat").read().rsplit(")",1)[1].split(); return (int(f[11])+int(f[12]))/100
# client
c=socket.create_connection(("127.0.0.1",c2s))
def rd(pat):
    buf=b""
    while pat not in buf: buf+=c.recv(65536)
    return buf
H=b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
c.sendall(H); rd(b"</stream:features>")
c.sendall(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"+base64.b64encode(b"\0alice\0pw-alice")+b"</auth>"); rd(b"success")
c.sendall(H); rd(b"</stream:features>")
c.sendall(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind></iq>"); rd(b"</iq>")
c.sendall(b"<presence/>")
got=[0]
def reader():
    while True:
        d=c.recv(1<<20)
        if not d: break
        got[0]+=d.count(b"</message>")
threading.Thread(target=reader,daemon=True).start()
k=socket.create_connection(("127.0.0.1",comp))
k.sendall(b"<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='rooms.localhost'>")
buf=b""
while b"id=" not in buf: buf+=k.recv(4096)
sid=re.search(rb"id=['\"]([^'\"]+)",buf).group(1)
k.sendall(b"<handshake>"+hashlib.sha1(sid+b"s").hexdigest().encode()+b"</handshake>")
buf=b""
while b"handshake" not in buf: buf+=k.recv(4096)
shapes={
 "minimal": "<message type='groupchat' from='bench@rooms.localhost/load01' to='alice@localhost/r'><body>bench message 1234</body></message>",
 "ours": "<message type='groupchat' from='bench@rooms.localhost/load01' to='alice@localhost/r'><body>bench message 1234</body><occupant-id xmlns='urn:xmpp:occupant-id:0' id='d624e1723ecd6c4ad4d8122b9c2ec523'/><stanza-id xmlns='urn:xmpp:sid:0' id='0006611ed8b6b75c9e8fe464' by='bench@rooms.localhost'/></message>",
 "event": '<message type=\'groupchat\' from=\'bench@rooms.localhost/Forge\' to=\'alice@localhost/r\'><body>[Codertocat/Hello-World] Codertocat opened #1 *Spelling error in the README file* — https://github.com/Codertocat/Hello-World/issues/1</body><thread>caseroom-0123456789abcdef01234567</thread><json xmlns=\'urn:xmpp:json:0\'>{"@context": ["https://www.w3.org/ns/activitystreams", {"caseroom": "urn:caseroom:"}], "actor": {"name": "Codertocat", "preferredUsername": "Codertocat", "type": "Person", "url": "https://github.com/Codertocat"}, "caseroom:action": "opened", "caseroom:assignees": ["Codertocat"], "caseroom:case": "Codertocat/Hello-World#1", "caseroom:event": "issue", "caseroom:labels": ["bug"], "caseroom:tracker": "forge", "caseroom:verb": "opened", "object": {"caseroom:reference": "#1", "name": "Spelling error in the README file", "type": "Page", "url": "https://github.com/Codertocat/Hello-World/issues/1"}, "published": "2019-05-15T15:20:18Z", "summary": "Codertocat opened #1 \\"Spelling error in the README file\\"", "target": {"name": "Codertocat/Hello-World", "type": "Group", "url": "https://github.com/Codertocat/Hello-World"}, "type": "Create", "url": "https://github.com/Codertocat/Hello-World/issues/1"}</json><occupant-id xmlns=\'urn:xmpp:occupant-id:0\' id=\'d624e1723ecd6c4ad4d8122b9c2ec523\'/><stanza-id xmlns=\'urn:xmpp:sid:0\' id=\'0006611ed8b6b75c9e8fe464\' by=\'bench@rooms.localhost\'/></message>',
 "mamresult": "<message to='alice@localhost/r' from='bench@rooms.localhost'><result xmlns='urn:xmpp:mam:2' id='0006611ed8b6b75c9e8fe464' queryid='x'><forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' stamp='2026-11-25T19:29:33.030Z'/><message xmlns='jabber:client' type='groupchat' from='bench@rooms.localhost/load01'><body>archived message 1234</body><occupant-id xmlns='urn:xmpp:occupant-id:0' id='d624e1723ecd6c4ad4d8122b9c2ec523'/><stanza-id xmlns='urn:xmpp:sid:0' id='0006611ed8b6b75c9e8fe464' by='bench@rooms.localhost'/></message></forwarded></result></message>",
}
N=20000
for name, s in shapes.items():
    s=s.encode(); got[0]=0
    c0=cpu(); t=time.time()
    for i in range(0,N,100): k.sendall(s*100)
    while got[0] < N: time.sleep(0.01)
    el=time.time()-t; c1=cpu()
    print(f"{name:10} {N/el:8.0f}/s  prosody cpu/stanza {1e6*(c1-c0)/N:6.1f} us  ({len(s)} bytes)")
subprocess.run([os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "servers", "stop.sh"), D])
