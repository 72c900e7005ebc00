#!/usr/bin/env python3
"""tacker-op.py COMMAND ARGS...: one step against the Tacker VNFM of a tacker-up.sh cloud, for the
direct-mode tests (tests/direct.rs). Reads the environment of openstack.env + tacker.env.
Prints one JSON document on stdout; exits non-zero with the reason on stderr.

  onboard VNFD_ID PKG_DIR           -> {"pkgId": ...}       (vnfpkgm v1, waits for ONBOARDED)
  create VNFD_ID NAME               -> the VnfInstance
  lcm INST PATH REQUEST_JSON        -> the final VnfLcmOpOcc (POST, then polls the op occ)
  instantiate INST                  -> the final VnfLcmOpOcc (the sample package's request)
  show INST                         -> the VnfInstance, or {"status": 404}
  delete INST                       -> {"status": ...} (retries 409: Tacker holds the lock a moment)
  pkg-delete PKG_ID                 -> {"status": ...}
  subs                              -> every subscription (all pages)
  sub-delete SUB_ID                 -> {"status": ...}
  fail OCC_ID                       -> {"status": ...} (give up a FAILED_TEMP occurrence)
  appcred-create NAME               -> {"id", "secret", "userId"} (Keystone application credential)
  appcred-delete USER_ID ID         -> {"status": ...}
"""
import io, json, os, sys, time, uuid, zipfile
import urllib.error, urllib.request

E = os.environ
TACKER = E["TACKER_URL"]; KS = E["KEYSTONE_URL"]
OP_TIMEOUT = int(E.get("OP_TIMEOUT", "600"))


def token():
    auth = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": E["OS_USERNAME"], "domain": {"id": "default"}, "password": E["OS_PASSWORD"]}}},
        "scope": {"project": {"name": E["OS_PROJECT_NAME"], "domain": {"id": "default"}}}}}
    r = urllib.request.Request(KS + "/auth/tokens", data=json.dumps(auth).encode(),
                               headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(r, timeout=60) as resp:
        return resp.headers["X-Subject-Token"]


TOKEN = token()


def http(method, url, body=None, raw=None, ctype="application/json", v2=True):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Accept": "application/json", "X-Auth-Token": TOKEN}
    if v2:
        h["Version"] = "2.0.0"
    if data is not None:
        h["Content-Type"] = ctype
    r = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(r, timeout=120) as resp:
            code, hdrs, b = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        code, hdrs, b = e.code, e.headers, e.read()
    try:
        j = json.loads(b) if b else None
    except ValueError:
        j = b.decode(errors="replace")
    return code, hdrs, j


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def lcm(inst, path, req):
    code, hdrs, j = http("POST", "%s/vnflcm/v2/vnf_instances/%s/%s" % (TACKER, inst, path), req)
    if code != 202:
        fail("%s -> %s %s" % (path, code, j))
    occ = hdrs["Location"].rstrip("/").rsplit("/", 1)[1]
    end = time.time() + OP_TIMEOUT
    while time.time() < end:
        code, _, o = http("GET", "%s/vnflcm/v2/vnf_lcm_op_occs/%s" % (TACKER, occ))
        if code == 200 and o.get("operationState") in ("COMPLETED", "FAILED_TEMP", "FAILED", "ROLLED_BACK"):
            return o
        time.sleep(1)
    fail("op occ %s not final after %ss" % (occ, OP_TIMEOUT))


cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "onboard":
    vnfd_id, pkg_dir = args
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for root, _, files in os.walk(pkg_dir):
            for fn in sorted(files):
                p = os.path.join(root, fn)
                data = open(p, "rb").read()
                if fn.endswith(".yaml"):
                    data = data.replace(b"6b2a7b0e-cf00-4c0d-9d1e-0000000c3f01", vnfd_id.encode())
                z.writestr(os.path.relpath(p, pkg_dir), data)
    code, _, pkg = http("POST", TACKER + "/vnfpkgm/v1/vnf_packages", {"userDefinedData": {"purpose": "warden-direct-test"}}, v2=False)
    if code != 201:
        fail("create package -> %s %s" % (code, pkg))
    code, _, j = http("PUT", TACKER + "/vnfpkgm/v1/vnf_packages/%s/package_content" % pkg["id"], raw=buf.getvalue(),
                      ctype="application/zip", v2=False)
    if code != 202:
        fail("upload -> %s %s" % (code, j))
    for _ in range(600):
        code, _, p = http("GET", TACKER + "/vnfpkgm/v1/vnf_packages/" + pkg["id"], v2=False)
        if p.get("onboardingState") == "ONBOARDED":
            print(json.dumps({"pkgId": pkg["id"]}))
            sys.exit(0)
        if p.get("onboardingState") == "ERROR" or p.get("onboardingFailureDetails"):
            fail("onboarding failed: %s" % p)
        time.sleep(0.5)
    fail("package not ONBOARDED")
elif cmd == "create":
    vnfd_id, name = args
    code, _, inst = http("POST", TACKER + "/vnflcm/v2/vnf_instances", {"vnfdId": vnfd_id, "vnfInstanceName": name})
    if code != 201:
        fail("create -> %s %s" % (code, inst))
    print(json.dumps(inst))
elif cmd == "lcm":
    print(json.dumps(lcm(args[0], args[1], json.loads(args[2]))))
elif cmd == "instantiate":
    VIM = {"vim1": {"vimId": str(uuid.uuid4()), "vimType": "ETSINFV.OPENSTACK_KEYSTONE.V_3",
                    "interfaceInfo": {"endpoint": KS},
                    "accessInfo": {"username": E["OS_USERNAME"], "password": E["OS_PASSWORD"],
                                   "project": E["OS_PROJECT_NAME"], "projectDomain": "Default",
                                   "userDomain": "Default", "region": "RegionOne"}}}
    req = {"flavourId": "simple", "instantiationLevelId": "instantiation_level_1",
           "extVirtualLinks": [{"id": "ext-vl-net1", "resourceId": E["NETWORK_ID"], "extCps": [{
               "cpdId": "VDU1_CP1", "cpConfig": {"VDU1_CP1_1": {"cpProtocolData": [{
                   "layerProtocol": "IP_OVER_ETHERNET",
                   "ipOverEthernet": {"ipAddresses": [{"type": "IPV4", "numDynamicAddresses": 1}]}}]}}}]}],
           "vimConnectionInfo": VIM}
    print(json.dumps(lcm(args[0], "instantiate", req)))
elif cmd == "show":
    code, _, j = http("GET", TACKER + "/vnflcm/v2/vnf_instances/" + args[0])
    print(json.dumps(j if code == 200 else {"status": code}))
elif cmd == "delete":
    for _ in range(120):
        code, _, j = http("DELETE", TACKER + "/vnflcm/v2/vnf_instances/" + args[0])
        if code != 409:
            break
        time.sleep(0.5)
    print(json.dumps({"status": code}))
elif cmd == "pkg-delete":
    http("PATCH", TACKER + "/vnfpkgm/v1/vnf_packages/" + args[0], {"operationalState": "DISABLED"}, v2=False)
    for _ in range(40):
        code, _, _ = http("DELETE", TACKER + "/vnfpkgm/v1/vnf_packages/" + args[0], v2=False)
        if code == 204:
            break
        time.sleep(0.5)
    print(json.dumps({"status": code}))
elif cmd == "subs":
    code, _, j = http("GET", TACKER + "/vnflcm/v2/subscriptions")
    print(json.dumps(j if code == 200 else []))
elif cmd == "sub-delete":
    code, _, _ = http("DELETE", TACKER + "/vnflcm/v2/subscriptions/" + args[0])
    print(json.dumps({"status": code}))
elif cmd == "fail":
    # A FAILED_TEMP occurrence given up (SOL 003 5.4.16): the VNF can be terminated again.
    code, _, j = http("POST", TACKER + "/vnflcm/v2/vnf_lcm_op_occs/%s/fail" % args[0])
    print(json.dumps({"status": code}))
elif cmd == "appcred-create":
    # A Keystone application credential of the test user (its OAuth 2.0 client: Keystone's
    # /v3/OS-OAUTH2/token takes its id and secret as client_id / client_secret).
    r = urllib.request.Request(KS + "/auth/tokens", method="GET",
                               headers={"X-Auth-Token": TOKEN, "X-Subject-Token": TOKEN})
    with urllib.request.urlopen(r, timeout=60) as resp:
        user = json.loads(resp.read())["token"]["user"]["id"]
    # The roles named (the standard ones the test user holds), not "all of the token's": on a
    # shared cloud another user's test may assign and remove roles meanwhile.
    roles = [{"name": r} for r in ("admin", "member", "reader")]
    code, _, j = http("POST", KS + "/users/%s/application_credentials" % user,
                      {"application_credential": {"name": args[0], "roles": roles}}, v2=False)
    if code != 201:
        fail("application credential -> %s %s" % (code, j))
    a = j["application_credential"]
    print(json.dumps({"id": a["id"], "secret": a["secret"], "userId": user}))
elif cmd == "appcred-delete":
    code, _, _ = http("DELETE", KS + "/users/%s/application_credentials/%s" % (args[0], args[1]), v2=False)
    print(json.dumps({"status": code}))
else:
    fail("unknown command " + cmd)
