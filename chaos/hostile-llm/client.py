# Sends one "MODE:<mode> please" message per mode through nginx (scripts/stack.sh on 127.0.0.1:8080)
# and prints what each user got: python3 chaos/hostile-llm/client.py garbage,huge,stall
# Needs the `websockets` package (pip install websockets).
import asyncio, json, sys, time, urllib.request, websockets
MODES = sys.argv[1].split(",")
async def one(mode):
    user = f"hostile-{mode}-{int(time.time())}"
    tok = json.load(urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:8080/token?userid={user}", method="POST")))["token"]
    async with websockets.connect(f"ws://127.0.0.1:8080/ws?userid={user}&token={tok}", max_size=None, origin="http://127.0.0.1:8080") as ws:
        await ws.send(json.dumps({"type": "message", "content": f"MODE:{mode} please", "id": "m1"}))
        t0 = time.time(); seen = []
        while time.time() - t0 < 240:
            try:
                f = json.loads(await asyncio.wait_for(ws.recv(), 240 - (time.time() - t0)))
            except asyncio.TimeoutError:
                break
            t = f.get("type")
            if t in ("delta",): continue
            seen.append(t)
            if t in ("response", "error", "llm_failed") or (t == "error"):
                short = {k: (v[:80] + f"...({len(v)} chars)" if isinstance(v, str) and len(v) > 80 else v) for k, v in f.items()}
                print(f"{mode:10s} after {time.time()-t0:6.1f} s: {short}  (frames: {seen})", flush=True); return
        print(f"{mode:10s} NO FINAL ANSWER after {time.time()-t0:.0f} s (frames: {seen})", flush=True)
async def main(): await asyncio.gather(*(one(m) for m in MODES))
asyncio.run(main())
