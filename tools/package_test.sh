#!/usr/bin/env bash
# The Debian package on this machine, as an administrator would use it (make test-package; make test runs it):
# build it from the committed tree, install it with apt-get (Debian's dependencies come along), start the
# appliance with the unit's ExecStart line as the service user with only the unit's capability (setpriv: no
# systemd here), C-ECHO and C-STORE it on port 104 with DCMTK, stop it; rebuild with a bumped version and
# upgrade: the stored object and an edited configuration survive; purge: nothing is left.  One line per check,
# then "package: N passed, N failed".  Needs root (it installs and removes a package).
set -uo pipefail
cd "$(dirname "$0")/.."
passed=0
failed=0
check() {  # check "what" command...
    local what=$1
    shift
    if "$@" >/tmp/package_test.out 2>&1; then
        echo "ok      $what"
        passed=$((passed + 1))
    else
        echo "FAILED  $what"
        sed 's/^/        /' /tmp/package_test.out | tail -20
        failed=$((failed + 1))
    fi
}
unit=debian/dicom-appliance.service
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
capability=$(sed -n 's/^AmbientCapabilities=CAP_//p' "$unit" | tr 'A-Z' 'a-z')
work=$(mktemp -d)
appliance_pid=""
stop_appliance() {
    if [ -n "$appliance_pid" ] && kill -0 "$appliance_pid" 2>/dev/null; then
        kill -TERM "$appliance_pid"
        for _ in $(seq 1 100); do kill -0 "$appliance_pid" 2>/dev/null || break; sleep 0.1; done
    fi
    appliance_pid=""
}
trap 'stop_appliance; rm -rf "$work"' EXIT

build() {  # build VERSION: the package of the committed tree with that version, into $work/VERSION/
    rm -rf "$work/src" && mkdir -p "$work/src" "$work/$1"
    git archive HEAD | tar -x -C "$work/src"
    sed -i "1s/(.*)/($1)/" "$work/src/debian/changelog"
    (cd "$work/src" && env -u PYTHONPATH PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b --no-sign) \
        && cp "$work"/dicom-appliance_"$1"_all.deb "$work/$1/"
}
start() {  # the unit's ExecStart as the service user, the unit's one capability, until port 104 answers
    setpriv --reuid=dicom-appliance --regid=dicom-appliance --init-groups --inh-caps=+"$capability" \
        --ambient-caps=+"$capability" --bounding-set=-all,+"$capability" --no-new-privs -- \
        env -u PYTHONPATH $exec_start >"$work/appliance.log" 2>&1 &
    appliance_pid=$!
    for _ in $(seq 1 150); do
        echoscu -to 2 -aec DISK_SERVER 127.0.0.1 104 >/dev/null 2>&1 && return 0
        kill -0 "$appliance_pid" 2>/dev/null || { cat "$work/appliance.log"; return 1; }
        sleep 0.2
    done
    cat "$work/appliance.log"
    return 1
}
object() {  # a small CT image to store
    env -u PYTHONPATH /usr/bin/python3 - "$work/ct.dcm" <<'PYTHON'
import sys
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
ds = Dataset()
ds.file_meta = FileMetaDataset()
ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.99.1.1"
ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.99", "1.2.826.0.1.3680043.10.99.1"
ds.PatientName, ds.PatientID, ds.Modality = "Package^Test", "PKG1", "CT"
ds.is_little_endian, ds.is_implicit_VR = True, False
ds.save_as(sys.argv[1], write_like_original=False)
PYTHON
}
stored() {  # the object is in the archive, owned by the service user
    local found
    found=$(find /var/lib/dicom-appliance -name '*.dcm' -user dicom-appliance | head -1)
    [ -n "$found" ]
}

check "build 0.1.0 (dpkg-buildpackage)" build 0.1.0
check "lintian: no error" lintian --fail-on error "$work"/0.1.0/dicom-appliance_0.1.0_all.deb
check "install with apt-get" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$work"/0.1.0/dicom-appliance_0.1.0_all.deb
check "the service user exists" getent passwd dicom-appliance
check "/var/lib/dicom-appliance is 0750 and the user's" test "$(stat -c '%a %U' /var/lib/dicom-appliance)" = "750 dicom-appliance"
check "the configuration is a conffile" grep -qx /etc/dicom-appliance/appliance.toml /var/lib/dpkg/info/dicom-appliance.conffiles
check "the unit's ExecStart runs twistd3 on the conffile" test -x "${exec_start%% *}"
check "systemd-analyze verify the unit" sh -c 'if command -v systemd-analyze >/dev/null; then systemd-analyze verify /lib/systemd/system/dicom-appliance.service 2>&1 | grep -v "^$" | grep -iv "not found\|ignoring\|executable path" | (! grep .); fi'
check "man pages" test -f /usr/share/man/man1/appliance-passwd.1.gz
check "appliance-passwd installed" sh -c 'echo "a long password" | appliance-passwd --stdin alice | grep -q "^alice = \"scrypt"'
check "start as dicom-appliance with only CAP_NET_BIND_SERVICE" start
check "C-ECHO on port 104" echoscu -to 5 -aec DISK_SERVER 127.0.0.1 104
object
check "C-STORE on port 104" storescu -to 10 -aec DISK_SERVER 127.0.0.1 104 "$work/ct.dcm"
check "stored, as the service user" stored
stop_appliance
check "stopped cleanly" sh -c "grep -q 'Server Shut Down' '$work/appliance.log'"
echo '# edited by the administrator' >> /etc/dicom-appliance/appliance.toml
check "build 0.1.1" build 0.1.1
check "upgrade to 0.1.1 (configuration kept as edited)" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    -o Dpkg::Options::=--force-confold "$work"/0.1.1/dicom-appliance_0.1.1_all.deb
check "version 0.1.1 installed" sh -c 'dpkg-query -W -f="\${Version}" dicom-appliance | grep -qx 0.1.1'
check "the edited configuration survived" grep -q '# edited by the administrator' /etc/dicom-appliance/appliance.toml
check "the stored object survived" stored
check "starts again after the upgrade" start
check "C-ECHO after the upgrade" echoscu -to 5 -aec DISK_SERVER 127.0.0.1 104
stop_appliance
check "remove keeps data and configuration" sh -c 'DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq dicom-appliance \
    && test -f /etc/dicom-appliance/appliance.toml && test -d /var/lib/dicom-appliance'
check "purge removes them" sh -c 'DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq dicom-appliance \
    && test ! -e /etc/dicom-appliance && test ! -e /var/lib/dicom-appliance && ! getent passwd dicom-appliance'
check "nothing of the package is left" sh -c '! dpkg-query -W dicom-appliance 2>/dev/null | grep -q . \
    && test ! -e /usr/lib/python3/dist-packages/twisted/plugins/appliance_plugin.py && test ! -e /usr/bin/appliance-echo'
echo "package: $passed passed, $failed failed"
[ "$failed" = 0 ]
