from twisted.application.service import ServiceMaker

appliance = ServiceMaker(
    "DICOM appliance",
    "appliance.tap",
    "Disk-Server, Memory-Server, Web Software-Server and Memory-Manager DICOM Application Entities",
    "appliance",
)
