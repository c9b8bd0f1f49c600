"""What the clean action (C) of Table E.1-1 means, row by row.

PS3.15 defines C as "replace with values of similar meaning known not to identify the
patient". FIONA keeps a cleaned value only when it has the strict form of its VR and meaning;
anything else takes the row's *fallback*: the row's basic-profile code (X, Z, D or a combined
code, resolved by the engine as for any other row), i.e. exactly what would happen without the
option. That is always a conformant outcome (the basic code is what the standard prescribes
when nothing is retained) and never keeps the value. Every C row of the shipped table has one
rule in `RULES` (tests/test_deid_clean.py checks that no row is missing, and that each rule
fits the row's VR); a C row of another table edition without a rule takes its fallback.

The rules (`Rule`):

- DATE (DA; Modified Dates): a valid calendar date written YYYYMMDD (one or more values,
  no ranges, no "YYYY.MM.DD" ACR-NEMA form) is shifted by the participant's offset; under Full
  Dates it would be kept; anything else (text, "2026-03-14", "20261345") takes the fallback.
- DATETIME (DT; Modified Dates): YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX] with valid ranges
  and a valid offset (see TZ_OFFSET): the date part is shifted, time and offset kept.
- TIME (TM; Modified Dates): HH[MM[SS[.F{1,6}]]] with HH 00-23, MM 00-59, SS 00-60: kept
  (times carry no date); "10:15", "2500" or text take the fallback.
- TZ_OFFSET (TimezoneOffsetFromUTC, SH; Modified Dates): "+HHMM" or "-HHMM" with MM one of
  00/15/30/45, from -1200 to +1400 ("-0000" is not a valid offset): kept, anything else removed.
- DESCRIPTOR (Clean Descriptors, Retain Patient Characteristics: descriptions, names and labels
  of technical things, e.g. StudyDescription, ProtocolName, ROIName, and short clinical
  descriptors, e.g. Allergies): the text is kept with `clean_text` applied: every identifying
  value of the source (all person-name parts, IDs, accession number, birth date, institution,
  address, telephone; see `fiona.deid.identifiers.Identifiers`), every date or time written in
  any common way, every word holding 5 or more digits in a row (IDs, YYYYMMDD, phone numbers)
  and every run of 7 or more digits split by spaces or dashes (phone numbers) is cut out. If
  nothing with a letter or digit is left, the fallback is taken. What this cannot recognise is
  a name that appears nowhere in the source's name attributes (e.g. a colleague's name typed
  into a description); the verification gate cannot either. This is the residual risk of the
  Clean Descriptors option: a project that cannot accept it does not turn the option on.
- NARRATIVE (comments, notes, histories, reasons, impressions, findings, label and annotation
  text: prose that people type about the patient or the visit): always the fallback. FIONA has
  no text cleaner that can find arbitrary names, places and dates in prose, so prose is treated
  as the basic profile treats it even when the option asks to clean it.
- BINARY (OB values: MakerNote, DeviceSettingDescription, FrameOriginTimestamp, curve and
  overlay data): cannot be cleaned, always the fallback (D writes a dummy of the VR, e.g. 8
  zero bytes for FrameOriginTimestamp).
- SEQUENCE (code sequences, RequestAttributesSequence, ContentSequence, AcquisitionContext-,
  SpecimenPreparation-, GraphicAnnotationSequence, ...): kept, and every item de-identified
  like any dataset; free text in it that the table does not list (e.g. an SR TextValue, a
  CodeMeaning) is cleaned with `clean_text` (coded values, `CODE_KEYWORDS`, only of the
  source's identifiers: a SNOMED code is digits, not a phone number). The specimen module's
  content items (SpecimenPreparationSequence's steps) follow `fiona.deid.specimen` instead:
  coded items kept, identifier items keyed, free-text items dropped.
- SAFE_PRIVATE (the Private Attributes row, Retain Safe Private): a private element is kept
  only when it is on the profile's safe-private list; its value then follows the rules of its
  VR like any unlisted element (dates shifted, UIDs replaced). The engine handles it in its
  private-element pass, not through `clean_value`.

No C row has an AS, CS, DS, IS or UI value, so no rule for those VRs is needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, timedelta
from enum import Enum


class Rule(Enum):
    DATE = "date"
    DATETIME = "datetime"
    TIME = "time"
    TZ_OFFSET = "tz_offset"
    DESCRIPTOR = "descriptor"
    NARRATIVE = "narrative"
    BINARY = "binary"
    SEQUENCE = "sequence"
    SAFE_PRIVATE = "safe_private"


#: the VRs a rule can clean; an element of another VR takes the fallback
RULE_VRS: dict[Rule, frozenset[str]] = {
    Rule.DATE: frozenset({"DA"}),
    Rule.DATETIME: frozenset({"DT"}),
    Rule.TIME: frozenset({"TM"}),
    Rule.TZ_OFFSET: frozenset({"SH"}),
    Rule.DESCRIPTOR: frozenset({"LO", "SH", "ST", "LT", "UT", "UC"}),
    Rule.NARRATIVE: frozenset({"LO", "SH", "ST", "LT", "UT", "UC"}),
    Rule.BINARY: frozenset({"OB", "OW", "OB or OW", "US or OW", "US or SS or OW"}),
    Rule.SEQUENCE: frozenset({"SQ"}),
    Rule.SAFE_PRIVATE: frozenset(),
}

# --- the rows: every row of Table E.1-1 (2026c) that is C under some option ----------------------
# Rows are named by keyword; masked rows without one by the table's name for them.
_ROWS: dict[Rule, str] = {
    Rule.DATE: """
        InstanceCreationDate StudyDate SeriesDate AcquisitionDate ContentDate OverlayDate
        CurveDate LastMenstrualDate EthicsCommitteeApprovalEffectivenessStartDate
        EthicsCommitteeApprovalEffectivenessEndDate CalibrationDate DateOfSecondaryCapture
        DateOfLastCalibration DateOfManufacture DateOfInstallation DateOfLastDetectorCalibration
        ModifiedImageDate StudyVerifiedDate StudyReadDate ScheduledStudyStartDate
        ScheduledStudyStopDate StudyArrivalDate StudyCompletionDate ScheduledAdmissionDate
        ScheduledDischargeDate AdmittingDate DischargeDate ScheduledProcedureStepStartDate
        ScheduledProcedureStepEndDate PerformedProcedureStepStartDate
        PerformedProcedureStepEndDate IssueDateOfImagingServiceRequest
        FindingsGroupRecordingDateTrial DateOfDocumentOrVerbalTransactionTrial Date
        ObservationDateTrial PresentationCreationDate SelectorDAValue CreationDate
        StructureSetDate TreatmentControlPointDate FirstTreatmentDate MostRecentTreatmentDate
        SafePositionExitDate SafePositionReturnDate TreatmentDate RTPlanDate
        SourceStrengthReferenceDate ReviewDate IntendedPhaseStartDate IntendedPhaseEndDate
        InterpretationRecordedDate InterpretationTranscriptionDate InterpretationApprovalDate""",
    Rule.DATETIME: """
        InstanceCoercionDateTime AcquisitionDateTime GPSDateStamp
        RadiopharmaceuticalStartDateTime RadiopharmaceuticalStopDateTime
        DateTimeOfLastCalibration CalibrationDateTime FrameAcquisitionDateTime
        FrameReferenceDateTime SourceStartDateTime SourceEndDateTime StartAcquisitionDateTime
        EndAcquisitionDateTime FunctionalSyncPulse DecayCorrectionDateTime
        ExclusionStartDateTime InstructionPerformedDateTime ContributionDateTime
        ImpedanceMeasurementDateTime ScheduledProcedureStepStartDateTime
        ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepModificationDateTime
        ExpectedCompletionDateTime PerformedProcedureStepStartDateTime
        PerformedProcedureStepEndDateTime ProcedureStepCancellationDateTime VerificationDateTime
        ObservationDateTime ObservationStartDateTime EffectiveStartDateTime
        EffectiveStopDateTime ParticipationDateTime DateTime ReferencedDateTime
        AnnotationDateTime SegmentDefinitionDateTime HL7DocumentEffectiveTime
        ApprovalStatusDateTime ProductExpirationDateTime SubstanceAdministrationDateTime
        AssertionDateTime AssertionExpirationDateTime EffectiveDateTime InformationIssueDateTime
        HangingProtocolCreationDateTime SelectorDTValue SOPAuthorizationDateTime
        DigitalSignatureDateTime AttributeModificationDateTime ROIDateTime
        ROIObservationDateTime TreatmentToleranceViolationDateTime
        RecordedRTControlPointDateTime InterlockDateTime OverrideDateTime
        BeamHoldTransitionDateTime""",
    Rule.TIME: """
        InstanceCreationTime StudyTime SeriesTime AcquisitionTime ContentTime OverlayTime
        CurveTime CalibrationTime InterventionDrugStopTime InterventionDrugStartTime
        TimeOfSecondaryCapture ContrastBolusStartTime ContrastBolusStopTime
        RadiopharmaceuticalStartTime RadiopharmaceuticalStopTime TimeOfLastCalibration
        TimeOfLastDetectorCalibration ModifiedImageTime StudyVerifiedTime StudyReadTime
        ScheduledStudyStartTime ScheduledStudyStopTime StudyArrivalTime StudyCompletionTime
        ScheduledAdmissionTime ScheduledDischargeTime AdmittingTime DischargeTime
        ScheduledProcedureStepStartTime ScheduledProcedureStepEndTime
        PerformedProcedureStepStartTime PerformedProcedureStepEndTime
        IssueTimeOfImagingServiceRequest FindingsGroupRecordingTimeTrial
        TimeOfDocumentCreationOrVerbalTransactionTrial Time ObservationTimeTrial
        PresentationCreationTime SelectorTMValue CreationTime StructureSetTime
        TreatmentControlPointTime SafePositionExitTime SafePositionReturnTime TreatmentTime
        RTPlanTime SourceStrengthReferenceTime ReviewTime IntendedFractionStartTime
        InterpretationRecordedTime InterpretationTranscriptionTime InterpretationApprovalTime""",
    Rule.TZ_OFFSET: "TimezoneOffsetFromUTC",
    Rule.DESCRIPTOR: """
        StudyDescription SeriesDescription AdmittingDiagnosesDescription PyramidDescription
        DerivationDescription MedicalAlerts Allergies Occupation
        ClinicalTrialTimePointDescription ClinicalTrialSeriesDescription ContrastBolusAgent
        ProtocolName AcquisitionFieldOfViewLabel AcquisitionDeviceProcessingDescription
        RespiratoryMotionCompensationTechniqueDescription MultienergyAcquisitionDescription
        DecompositionDescription AcquisitionProtocolDescription RequestedSeriesDescription
        ContributionDescription PyramidLabel RequestedProcedureDescription
        RequestedContrastAgent DischargeDiagnosisDescription SpecialNeeds
        ServiceEpisodeDescription PatientState MultiplexGroupLabel ChannelLabel
        ChannelDerivationDescription WaveformFilterDescription FilterLookupTableDescription
        ScheduledProcedureStepDescription PreMedication PerformedProcedureStepDescription
        ContainerDescription AcquisitionContextDescription SpecimenShortDescription MontageName
        MontageChannelLabel LongDeviceDescription AnnotationGroupLabel
        AnnotationGroupDescription PositionAcquisitionTemplateName
        PositionAcquisitionTemplateDescription StructureSetLabel StructureSetName
        StructureSetDescription ROIName ROIDescription ROIGenerationDescription
        ROIObservationLabel ROIObservationDescription RTPlanLabel RTPlanName RTPlanDescription
        TreatmentSites PrescriptionDescription DoseReferenceDescription
        FractionGroupDescription BeamDescription BolusDescription FixationDeviceDescription
        ShieldingDeviceDescription SetupTechniqueDescription CompensatorDescription
        TreatmentPositionGroupLabel RadiationDoseIdentificationLabel
        RadiationDoseInVivoMeasurementLabel RTToleranceSetLabel
        EquipmentFrameOfReferenceDescription RadiationGenerationModeLabel
        RadiationGenerationModeDescription TreatmentToleranceViolationDescription
        InterlockDescription InterlockOriginDescription
        PatientTreatmentPreparationProcedureParameterDescription
        PatientTreatmentPreparationMethodDescription DisplacementReferenceLabel
        ReasonForOmissionDescription ConceptualVolumeCombinationDescription
        ConceptualVolumeDescription UserContentLabel UserContentLongLabel EntityLabel
        EntityName EntityDescription EntityLongLabel RTPrescriptionLabel
        RTTreatmentApproachLabel TreatmentSite""",
    Rule.NARRATIVE: """
        IdentifyingComments NameToUseComment PronounComment
        SexParametersForClinicalUseCategoryComment GenderIdentityComment
        AdditionalPatientHistory PatientComments AcquisitionComments ImageComments
        FrameComments ReasonForStudy ReasonForVisit StudyComments VisitComments
        CommentsOnThePerformedProcedureStep CommentsOnRadiationDose SpecimenDetailedDescription
        ReasonForTheRequestedProcedure RequestedProcedureComments
        ReasonForTheImagingServiceRequest ImagingServiceRequestComments UnformattedTextValue
        LabelText PatientSetupPhotoDescription RTPhysicianIntentNarrative ReasonForSuperseding
        PriorTreatmentDoseDescription TreatmentTechniqueNotes PrescriptionNotes
        FractionationNotes InterpretationText InterpretationDiagnosisDescription Impressions
        ResultsComments OverlayComments""",
    Rule.BINARY: "MakerNote DeviceSettingDescription FrameOriginTimestamp OverlayData "
                 "Curve_Data",
    Rule.SEQUENCE: """
        AdmittingDiagnosesCodeSequence ReasonForVisitCodeSequence RequestAttributesSequence
        AcquisitionContextSequence SpecimenPreparationSequence
        ReasonForRequestedProcedureCodeSequence ContentSequence GraphicAnnotationSequence
        PrescriptionNotesSequence""",
    Rule.SAFE_PRIVATE: "Private_Attributes",
}

#: row name (keyword, or the table's name with "_" for spaces) -> rule
RULES: dict[str, Rule] = {name: rule for rule, names in _ROWS.items() for name in names.split()}

#: coded-entry attributes: inside a cleaned sequence only the source's identifiers are cut out
CODE_KEYWORDS = frozenset({"CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion",
                           "LongCodeValue", "URNCodeValue", "ContextIdentifier",
                           "MappingResource", "ContextGroupExtensionCreatorUID"})


def rule_for(keyword: str | None, name: str | None) -> Rule | None:
    """The rule of a table row (by keyword, else by its name); None: no rule, the fallback."""
    rule = RULES.get(keyword or "")
    if rule is None and name:
        rule = RULES.get(name.replace(" ", "_"))
    return rule


# --- strict forms --------------------------------------------------------------------------------
_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TM = re.compile(r"([01]\d|2[0-3])(?:([0-5]\d)(?:([0-5]\d|60)(?:\.\d{1,6})?)?)?")
_DT = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})"
                 r"(?:\.\d{1,6})?)?)?)?)?)?"
                 r"([+-]\d{4})?")
_TZ = re.compile(r"([+-])(\d{2})(00|15|30|45)")
_PAD = " \x00"


def parse_da(value: str) -> date | None:
    """A DA value written strictly YYYYMMDD as a date; None if it is not one."""
    m = _DA.fullmatch(value)
    if not m:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def valid_tm(value: str) -> bool:
    return _TM.fullmatch(value) is not None


def valid_tz(value: str) -> bool:
    """"+HHMM"/"-HHMM" from -1200 to +1400, minutes 00/15/30/45; "-0000" is not an offset."""
    m = _TZ.fullmatch(value)
    if not m:
        return False
    minutes = int(m[2]) * 60 + int(m[3])
    return minutes <= 14 * 60 if m[1] == "+" else 0 < minutes <= 12 * 60


def shift_da(value: str, days: int) -> str:
    """A strict DA value moved by `days`; ValueError if it is not one (OverflowError past
    year 9999)."""
    d = parse_da(value)
    if d is None:
        raise ValueError("not a date")
    d += timedelta(days=days)
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def shift_dt(value: str, days: int) -> str:
    """A strict DT value with its date part moved by `days` (precision, time and offset kept);
    ValueError if it is not one."""
    m = _DT.fullmatch(value)
    if not m:
        raise ValueError("not a date-time")
    y, mo, dd, hh, mi, ss, tz = m.groups()
    if (mo and not 1 <= int(mo) <= 12) or (hh and int(hh) > 23) or (mi and int(mi) > 59) \
            or (ss and int(ss) > 60) or (tz and not valid_tz(tz)):
        raise ValueError("not a date-time")
    d = date(int(y), int(mo or 1), int(dd or 1)) + timedelta(days=days)  # ValueError: bad day
    head = f"{d.year:04d}" + (f"{d.month:02d}" if mo else "") + (f"{d.day:02d}" if dd else "")
    return head + value[len(y) + len(mo or "") + len(dd or ""):]


def shift_values(text: str, dt: bool, days: int) -> str | None:
    """Every value of a DA (or DT: `dt`) element moved by `days`, values joined by "\\"; an
    empty value stays empty; None if any value is not of the strict form."""
    try:
        return "\\".join((shift_dt(v, days) if dt else shift_da(v, days)) if v else ""
                          for v in (v.strip(_PAD) for v in text.split("\\")))
    except (ValueError, OverflowError):
        return None


# --- free text -----------------------------------------------------------------------------------
_MONTH = r"(?:jan|feb|mar|apr|ma[iy]|jun|jul|aug|sep|o[ck]t|nov|de[cs])[a-z]*\.?"
_IN_TEXT = re.compile(
    r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}"                     # 14.03.2026, 2026-03-14, 3/14/26
    rf"|\d{{1,2}}\.?\s*{_MONTH},?\s*\d{{2,4}}"               # 14 March 2026, 14. mars 26
    rf"|\b{_MONTH}\s*\d{{1,2}}(?:st|nd|rd|th)?,?\s*\d{{2,4}}"  # March 14, 2026
    r"|\b\d{1,2}[:.h]\d{2}(?::\d{2})?\b(?![./-]\d)"        # 10:15, 10:15:30, 10h15
    r"|[\w-]*\d{5,}[\w-]*",                                 # IDs, YYYYMMDD, 12345678 ...
    re.IGNORECASE)
_DIGIT_GROUPS = re.compile(r"\+?\(?\d[\d ()-]{5,}\d")       # 55 97 40 00, (0)55-974000
_SPACES = re.compile(r"[ \t]{2,}")


def _phone(m: re.Match) -> str:
    return "" if sum(c.isdigit() for c in m[0]) >= 7 else m[0]


def clean_text(text: str, identifiers: re.Pattern | None, codes_only: bool = False) -> str:
    """`text` with the source's identifiers (`identifiers`, from
    `Identifiers.scrub_pattern`), dates, times and long numbers cut out (see the module doc).
    `codes_only`: only the source's identifiers (coded values are digits by design)."""
    out = identifiers.sub("", text) if identifiers is not None else text
    if not codes_only:
        out = _DIGIT_GROUPS.sub(_phone, _IN_TEXT.sub("", out))
    if out != text:
        out = _SPACES.sub(" ", out).strip()
    return out


def _meaningful(text: str) -> bool:
    return any(c.isalnum() for c in text)


def clean_value(rule: Rule, vr: str, text: str, dates: str, shift: Callable[[], int],
                identifiers: re.Pattern | None) -> str | None:
    """The cleaned form of one element's value `text` (values joined by "\\") under `rule`,
    or None: take the row's fallback. `dates` is the engine's date mode ("shift", "keep",
    "remove"); `shift()` the participant's offset in days."""
    if vr not in RULE_VRS[rule]:
        return None
    values = [v.strip(_PAD) for v in text.split("\\")]
    if rule in (Rule.DATE, Rule.DATETIME):
        if dates == "remove" or "" in values:
            return None
        shifted = shift_values(text, rule is Rule.DATETIME, shift() if dates == "shift" else 0)
        return None if shifted is None else shifted if dates == "shift" else text
    if rule is Rule.TIME:
        return text if dates != "remove" and all(valid_tm(v) for v in values) else None
    if rule is Rule.TZ_OFFSET:
        return text if dates != "remove" and len(values) == 1 and valid_tz(values[0]) else None
    if rule is Rule.DESCRIPTOR:
        out = clean_text(text, identifiers)
        return out if _meaningful(out) else None
    return None                     # NARRATIVE, BINARY: never kept
