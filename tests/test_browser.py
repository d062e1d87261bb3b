"""The web pages in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by Selenium.

The appliance runs as a twistd process on free ports; storescu fills its Disk-Server with a study whose patient's
name is markup and script.  The browser opens the pages, sees the devices with their C-ECHO status, picks the
Local archive, queries with ``*``, expands the study, loads it into memory, watches the progress bar finish,
opens the viewer and sees the image: its pixels are checked (a screenshot of the image element, not just the
element), and the name is shown as text and never run.  Screenshots of each step are kept in the test's
temporary folder.  Selenium's calls block: they run on a thread, the reactor keeps serving the subprocess.
"""

from __future__ import annotations

import os
import shutil
from io import BytesIO
from typing import Dict, List

from twisted.internet import threads
from twisted.trial import unittest

from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN

from . import test_memory_bound
from . import test_interop_load
from .support import deferred_test, free_port, run_program
from .support_data import make_dataset, write_part10
from .test_interop_load import STORESCU

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
STUDY = "1.2.826.0.1.3680043.10.91"
HOSTILE_NAME = "<img src=x onerror=alert(1)>^<script>alert(2)</script>"
PASSWORD = "a long enough password"
#: Seconds the browser waits for one thing to appear.
WAIT = 20


def _missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (make test installs it)"
    for program in (CHROMIUM, CHROMEDRIVER, STORESCU, test_interop_load.DCMQRSCP, test_interop_load.DCMQRIDX):
        if not os.path.exists(program):
            return f"{program} is not installed (make test installs it)"
    return None


def _study(folder: str) -> List[str]:
    """One study, one series of four 64x64 16-bit images with a gradient (so the rendered image is not flat)."""
    os.makedirs(folder)
    paths = []
    for number in range(1, 5):
        pixels = b"".join(((x * 16 + y * 4 + number * 100) & 0x0FFF).to_bytes(2, "little")
                          for y in range(64) for x in range(64))
        ds = make_dataset(patient=HOSTILE_NAME, patient_id="BROWSER1", study=STUDY, series=f"{STUDY}.1",
                          sop=f"{STUDY}.1.{number}", pixels=pixels)
        ds.Rows = ds.Columns = 64
        ds.InstanceNumber = number
        ds.StudyDescription = "<b>bold</b> & more"
        paths.append(write_part10(os.path.join(folder, f"{number}.dcm"), ds, EXPLICIT_VR_LITTLE_ENDIAN))
    return paths


GREEK_STUDY = "1.2.826.0.1.3680043.10.92"
GREEK_NAME = "Διονυσίου^Γιώργος"


def _greek_study(folder: str) -> List[str]:
    """A study whose patient's name is in Greek, in UTF-8 (ISO_IR 192)."""
    os.makedirs(folder)
    ds = make_dataset(patient=GREEK_NAME, patient_id="BROWSER2", study=GREEK_STUDY, series=f"{GREEK_STUDY}.1",
                      sop=f"{GREEK_STUDY}.1.1")
    ds.SpecificCharacterSet = "ISO_IR 192"
    return [write_part10(os.path.join(folder, "1.dcm"), ds, EXPLICIT_VR_LITTLE_ENDIAN)]


def browse(url: str, artefacts: str) -> Dict[str, object]:
    """Thread: the whole visit; returns what was seen (the test asserts on it)."""
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    seen: Dict[str, object] = {}
    wait = WebDriverWait(driver, WAIT)

    def shot(name: str) -> None:
        driver.save_screenshot(os.path.join(artefacts, f"{name}.png"))

    try:
        driver.get(url)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "tr[data-device='local'] td.ok")))
        seen["local status"] = driver.find_element(By.CSS_SELECTOR, "tr[data-device='local'] td.ok").text
        shot("1-devices")
        driver.find_element(By.LINK_TEXT, "Local archive").click()
        box = wait.until(EC.presence_of_element_located((By.NAME, "q")))
        box.send_keys("*", Keys.ENTER)
        row = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"tr.study[data-study='{STUDY}']")))
        seen["study row"] = row.text
        seen["markup in the results"] = len(driver.find_elements(By.CSS_SELECTOR, "table.results img, "
                                                                 "table.results script, table.results b"))
        wait.until(lambda d: "studies in" in d.find_element(By.CSS_SELECTOR, ".actions .status").text)
        seen["status"] = driver.find_element(By.CSS_SELECTOR, ".actions .status").text
        seen["greek row"] = driver.find_element(By.CSS_SELECTOR, f"tr.study[data-study='{GREEK_STUDY}']").text
        shot("2-query")
        row.find_element(By.CSS_SELECTOR, "button[title='Series']").click()
        series = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"tr.series[data-series='{STUDY}.1']")))
        series.find_element(By.CSS_SELECTOR, "button[title='Images']").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.image")) == 4)
        shot("3-expanded")
        row.find_element(By.XPATH, ".//button[text()='Load']").click()
        view = wait.until(EC.presence_of_element_located((By.LINK_TEXT, "View")))
        progress = row.find_element(By.TAG_NAME, "progress")
        seen["progress"] = (progress.get_attribute("value"), progress.get_attribute("max"))
        shot("4-loaded")
        view.click()
        image = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".viewer img[src*='/rendered']")))
        wait.until(lambda d: d.execute_script("const i = arguments[0]; return i.complete && i.naturalWidth > 0;",
                                              image))
        seen["natural size"] = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                                                     image)
        seen["pixels"] = Image.open(BytesIO(image.screenshot_as_png)).convert("L").getextrema()
        seen["first src"] = image.get_attribute("src")
        driver.find_element(By.CSS_SELECTOR, ".viewer .image").send_keys(Keys.ARROW_DOWN)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".viewer img").get_attribute("src") != seen["first src"])
        seen["second src"] = driver.find_element(By.CSS_SELECTOR, ".viewer img").get_attribute("src")
        seen["counter"] = driver.find_element(By.CSS_SELECTOR, "section .actions .status").text
        seen["attributes"] = driver.find_element(By.CSS_SELECTOR, ".viewer dl").text
        seen["title"] = driver.find_element(By.TAG_NAME, "h1").text
        seen["markup in the viewer"] = len(driver.find_elements(By.CSS_SELECTOR, "main img:not(.viewer img), "
                                                                "main script, main b"))
        shot("5-viewer")
        # a remote archive that answers few keys: DCMTK's dcmqrscp
        driver.get(url + "#/devices")
        wait.until(EC.presence_of_element_located((By.LINK_TEXT, "qrscp"))).click()
        box = wait.until(EC.presence_of_element_located((By.NAME, "q")))
        box.send_keys("*", Keys.ENTER)
        wait.until(lambda d: "studies in" in d.find_element(By.CSS_SELECTOR, ".actions .status").text)
        seen["remote status"] = driver.find_element(By.CSS_SELECTOR, ".actions .status").text
        remote = driver.find_element(By.CSS_SELECTOR, f"tr.study[data-study='{STUDY}']")
        remote.find_element(By.CSS_SELECTOR, "button[title='Series']").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"tr.series[data-series='{STUDY}.1']")))
        seen["remote markup"] = len(driver.find_elements(By.CSS_SELECTOR, "table.results img, table.results script"))
        seen["remote error"] = driver.find_element(By.CSS_SELECTOR, "section p.error").text
        shot("6-remote")
        try:
            seen["alert"] = driver.switch_to.alert.text
        except Exception:  # no alert: nothing was run
            seen["alert"] = None
        seen["console"] = [entry.get("message", "") for entry in driver.get_log("browser")] \
            if hasattr(driver, "get_log") else []
    except Exception:
        shot("failed")
        seen["page"] = driver.page_source[-4000:]
        raise
    finally:
        driver.quit()
    return seen


class BrowserTests(unittest.TestCase):
    timeout = 180
    skip = _missing()
    start_appliance = test_memory_bound.MemoryBoundTests.start_appliance
    start_dcmqrscp = test_interop_load.DcmqrscpTests.start_dcmqrscp

    @deferred_test
    async def test_find_load_and_view_in_a_browser(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        qrscp_port = free_port()
        appliance, disk_port, web_port = await self.start_appliance(root, devices={
            "qrscp": {"ae_title": "QRSCP", "host": "127.0.0.1", "port": qrscp_port, "timeout": 20}})
        files = _study(os.path.join(root, "study")) + _greek_study(os.path.join(root, "greek"))
        out, err, code = await run_program(STORESCU, ["-aec", "DISK_SERVER", "127.0.0.1", str(disk_port), *files])
        self.assertEqual(code, 0, out + err)
        await self.start_dcmqrscp(qrscp_port, files, None)
        artefacts = os.path.join(root, "screenshots")
        os.makedirs(artefacts)
        seen = await threads.deferToThread(browse, f"http://127.0.0.1:{web_port}/", artefacts)
        self.assertIn("reachable", seen["local status"])
        self.assertIn("<img src", seen["study row"])  # shown as text
        self.assertIn("<b>bold</b> & more", seen["study row"])
        self.assertEqual(seen["markup in the results"], 0)
        self.assertIn("2 studies", seen["status"])
        self.assertIn(GREEK_NAME, seen["greek row"])
        self.assertIn("2 studies", seen["remote status"])
        self.assertEqual((seen["remote markup"], seen["remote error"]), (0, ""))
        value, maximum = seen["progress"]
        self.assertEqual((value, maximum), ("4", "4"))
        self.assertEqual(seen["natural size"], [64, 64])
        low, high = seen["pixels"]
        self.assertLess(low, 64, "the image has dark pixels")
        self.assertGreater(high, 192, "and bright ones: a gradient, not a flat or missing image")
        self.assertNotEqual(seen["first src"], seen["second src"])
        self.assertIn("image 2 of 4", seen["counter"])
        self.assertIn("BROWSER1", seen["attributes"])
        self.assertIn("<script>", seen["title"])
        self.assertEqual(seen["markup in the viewer"], 0)
        self.assertIsNone(seen["alert"])
        self.assertEqual(sorted(os.listdir(artefacts)), ["1-devices.png", "2-query.png", "3-expanded.png",
                                                         "4-loaded.png", "5-viewer.png", "6-remote.png"])

    @deferred_test
    async def test_sign_in_first_when_users_are_configured(self):
        from appliance.web.auth import hash_password

        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        _, _, web_port = await self.start_appliance(root, web={"users": {"alice": hash_password(PASSWORD)}})
        artefacts = os.path.join(root, "screenshots")
        os.makedirs(artefacts)
        seen = await threads.deferToThread(sign_in, f"http://127.0.0.1:{web_port}/", artefacts)
        self.assertEqual(seen["first page"], "Sign in")
        self.assertEqual(seen["devices before"], 0, "nothing shown before signing in")
        self.assertIn("wrong user or password", seen["refused"])
        self.assertEqual(seen["after"], "Devices")
        self.assertIn("reachable", seen["local status"])
        self.assertEqual(seen["signed out"], "Sign in")


def sign_in(url: str, artefacts: str) -> Dict[str, object]:
    """Thread: refused with a wrong password, let in with the right one, signed out."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,800", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, WAIT)
    seen: Dict[str, object] = {}
    try:
        driver.get(url + "#/devices")
        form = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "form.signin")))
        seen["first page"] = driver.find_element(By.TAG_NAME, "h1").text
        seen["devices before"] = len(driver.find_elements(By.CSS_SELECTOR, "table.devices"))
        form.find_element(By.NAME, "user").send_keys("alice")
        form.find_element(By.NAME, "password").send_keys("not the password")
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "section p.error").text)
        seen["refused"] = driver.find_element(By.CSS_SELECTOR, "section p.error").text
        driver.save_screenshot(os.path.join(artefacts, "1-refused.png"))
        form.find_element(By.NAME, "password").send_keys(PASSWORD)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "tr[data-device='local'] td.ok")))
        seen["after"] = driver.find_element(By.TAG_NAME, "h1").text
        seen["local status"] = driver.find_element(By.CSS_SELECTOR, "tr[data-device='local'] td.ok").text
        driver.save_screenshot(os.path.join(artefacts, "2-signed-in.png"))
        driver.find_element(By.ID, "signout").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "form.signin")))
        seen["signed out"] = driver.find_element(By.TAG_NAME, "h1").text
    except Exception:
        driver.save_screenshot(os.path.join(artefacts, "failed.png"))
        raise
    finally:
        driver.quit()
    return seen

